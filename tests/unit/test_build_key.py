"""The key under which scripts/build-deb --cache stores a package: the same for the same inputs from any
checkout path, different when anything the package is made of changes, and blind to what is not in it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INPUTS = ["pyproject.toml", "README.md", "LICENSE", "falcoria_worker", "systemd", "tests", "packaging"]


def key(checkout: Path, *args: str) -> str:
    return subprocess.run(
        [str(checkout / "scripts/build-deb"), "--print-key", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The build's inputs, the build scripts and a file outside the package, at a deeper path."""
    checkout = tmp_path / "a" / "much" / "deeper" / "checkout"
    for name in [*INPUTS, "docs"]:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            checkout.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    (checkout / "scripts").mkdir()
    for name in ("build-deb", "apt-sources"):
        shutil.copy2(REPO / "scripts" / name, checkout / "scripts" / name)
    return checkout


def test_the_same_inputs_give_the_same_key_from_any_path(copy: Path) -> None:
    assert key(copy) == key(REPO)
    assert key(copy, "--dist", "trixie") == key(REPO, "--dist", "trixie")


def test_release_and_version_suffix_are_part_of_the_key(copy: Path) -> None:
    keys = {key(copy), key(copy, "--dist", "trixie"), key(copy, "--version-suffix", "upgradetest1")}
    assert len(keys) == 3


@pytest.mark.parametrize(
    "changed",
    ["falcoria_worker/runloop.py", "systemd/falcoria-worker@.service", "packaging/debian/rules",
     "tests/unit/test_merge.py", "pyproject.toml", "scripts/build-deb"],
)  # fmt: skip
def test_a_change_to_what_the_package_is_made_of_changes_the_key(copy: Path, changed: str) -> None:
    before = key(copy)
    with (copy / changed).open("a") as f:
        f.write("\n")
    assert key(copy) != before


def test_an_executable_bit_is_part_of_the_key(copy: Path) -> None:
    before = key(copy)
    (copy / "packaging/debian/rules").chmod(0o644)
    assert key(copy) != before


def test_files_outside_the_package_do_not_change_the_key(copy: Path) -> None:
    before = key(copy)
    (copy / "docs" / "benchmarks.md").write_text("another run\n")
    (copy / "falcoria_worker" / "__pycache__").mkdir(exist_ok=True)
    (copy / "falcoria_worker" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert key(copy) == before
