"""settings_doc.py: every settings reference of the repository is what config.py's tables render."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

from falcoria_worker import config
from falcoria_worker.settings_doc import SECTIONS, TARGETS, Target, worker_conf
from falcoria_worker.settings_io import parse_env_text

REPO = Path(__file__).parents[2]
REGENERATE = "make docs (scripts/gen-docs)"


@pytest.mark.parametrize("target", TARGETS, ids=[target.path for target in TARGETS])
def test_generated_docs_match_the_code(target: Target) -> None:
    current = (REPO / target.path).read_text(encoding="utf-8")
    wanted = target.regenerated(current)
    if wanted != current:
        diff = difflib.unified_diff(
            current.splitlines(), wanted.splitlines(), target.path, "rendered", lineterm="", n=1
        )
        pytest.fail(f"{target.path} differs from config.py's tables; run `{REGENERATE}`\n" + "\n".join(diff))


def test_sections_document_every_key_in_config_order() -> None:
    assert [key for section in SECTIONS for key, _ in section.keys] == list(config.KNOWN_KEYS)


def test_worker_conf_ships_with_every_line_commented_out() -> None:
    assert parse_env_text(worker_conf(), "worker.conf") == []


def test_a_missing_marker_is_named() -> None:
    markdown = next(target for target in TARGETS if target.path == "docs/design.md")
    with pytest.raises(ValueError, match=r"docs/design\.md"):
        markdown.regenerated("# design\n")


def test_gen_docs_check_passes_on_the_committed_tree() -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-docs"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
