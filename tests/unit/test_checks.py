"""The `check` line for STATE_DIR: FAIL only where `run` would stop, WARN where `run` will create it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from falcoria_worker.checks import FAIL, OK, WARN, _state_dir


def test_an_existing_writable_directory_is_ok(tmp_path: Path) -> None:
    assert _state_dir(tmp_path) == (OK, f"{tmp_path} writable")


@pytest.mark.parametrize("missing", ["1", "falcoria-worker/1"])
def test_a_missing_directory_run_can_create_is_a_warning_and_is_left_alone(
    tmp_path: Path, missing: str
) -> None:
    path = tmp_path / missing
    level, detail = _state_dir(path)
    assert level == WARN
    assert detail == f"{path} does not exist yet: `run` will create it"
    assert not (tmp_path / Path(missing).parts[0]).exists()


def test_a_file_in_the_way_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("")
    assert _state_dir(blocker) == (FAIL, f"{blocker} is not a directory")
    level, detail = _state_dir(blocker / "1")
    assert (level, detail) == (FAIL, f"{blocker / '1'} cannot be created: {blocker} is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_a_directory_nobody_may_create_or_write_fails(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert _state_dir(locked)[0] == FAIL
    level, detail = _state_dir(locked / "1")
    assert level == FAIL and "cannot create it" in detail
