"""The spool on a real filesystem: durable entries, safe names, order, and what a crash leaves behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from falcoria_worker.spool import Spool, SpoolEntry
from tests.fakes.scanledger import sample_report

PROJECT = "5f0c6f9e-3a51-4c1e-9d7e-2b2f0f4b6a11"


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "merged.xml"
    path.write_bytes(sample_report())
    return path


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def _put(spool: Spool, task_id: str, report: Path, mode: str = "insert") -> SpoolEntry:
    return spool.put(task_id, report, project=PROJECT, mode=mode, track_history=False)


def _names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_put_keeps_report_and_metadata(spool: Spool, report: Path) -> None:
    entry = _put(spool, "c5a1d6a2-0f6b-4b43-9c4e-1e6f5e2a7b90", report, mode="replace")
    assert report.read_bytes() == sample_report()  # the source is copied, not taken
    assert entry.xml.read_bytes() == sample_report()
    assert spool.has(entry.task_id)
    [pending] = Spool(spool.root).pending()  # as a restarted process sees it
    assert pending == entry
    assert (pending.project, pending.mode, pending.track_history) == (PROJECT, "replace", False)


def test_pending_is_oldest_first(spool: Spool, report: Path) -> None:
    for task_id in ("c", "b", "a"):  # against the alphabet, so name order cannot pass for age order
        _put(spool, task_id, report)
    assert [e.task_id for e in Spool(spool.root).pending()] == ["c", "b", "a"]


@pytest.mark.parametrize(
    "task_id",
    ["../escape", "a/b", "..", ".", ".hidden", "", "x" * 65, "a\x00b", "a b", "/etc/passwd", "a+1"],
)
def test_unsafe_task_ids_are_refused(spool: Spool, report: Path, tmp_path: Path, task_id: str) -> None:
    before = _names(tmp_path)
    with pytest.raises(ValueError, match="unsafe task id"):
        _put(spool, task_id, report)
    with pytest.raises(ValueError, match="unsafe task id"):
        spool.has(task_id)
    assert _names(tmp_path) == before


def test_a_task_is_spooled_once(spool: Spool, report: Path, tmp_path: Path) -> None:
    _put(spool, "t1", report)
    other = tmp_path / "other.xml"
    other.write_bytes(b"<other/>")
    with pytest.raises(FileExistsError):
        _put(spool, "t1", other)
    [entry] = spool.pending()
    assert entry.xml.read_bytes() == sample_report()
    assert not [p for p in spool.pending_dir.iterdir() if p.name.startswith(".")]


def test_done_removes_the_entry(spool: Spool, report: Path) -> None:
    entry = _put(spool, "t1", report)
    spool.done(entry)
    assert spool.pending() == []
    assert not spool.has("t1")
    assert list(spool.pending_dir.iterdir()) == []


def test_fail_moves_to_failed_with_reason_and_keeps_earlier_failures(spool: Spool, report: Path) -> None:
    spool.fail(_put(spool, "t1", report), "ScanLedger answered 404: Project not found")
    spool.fail(_put(spool, "t1", report), "ScanLedger answered 401: Invalid token")
    assert spool.pending() == []
    assert sorted(p.name for p in spool.failed_dir.iterdir()) == ["t1", "t1+1"]
    assert (
        spool.failed_dir / "t1" / "reason.txt"
    ).read_text() == "ScanLedger answered 404: Project not found\n"
    assert (
        spool.failed_dir / "t1+1" / "reason.txt"
    ).read_text() == "ScanLedger answered 401: Invalid token\n"
    assert (spool.failed_dir / "t1" / "nmap_report.xml").read_bytes() == sample_report()


def test_spool_is_private(spool: Spool) -> None:
    for path in (spool.root, spool.pending_dir, spool.failed_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_unreadable_metadata_is_set_aside_not_lost(spool: Spool, report: Path) -> None:
    entry = _put(spool, "t1", report)
    (entry.xml.parent / "meta.json").write_text("{not json")
    assert spool.pending() == []
    assert (spool.failed_dir / "t1" / "nmap_report.xml").read_bytes() == sample_report()
    assert "meta.json unreadable" in (spool.failed_dir / "t1" / "reason.txt").read_text()


def test_crash_leftovers_are_removed_at_start(spool: Spool, report: Path) -> None:
    entry = _put(spool, "kept", report)
    (spool.pending_dir / ".tmp-t2-0011aabb").mkdir()
    (spool.pending_dir / ".tmp-t2-0011aabb" / "nmap_report.xml").write_bytes(b"<half")
    (spool.pending_dir / ".done-t3").mkdir()
    assert spool.pending() == [entry]  # dot names are never entries
    Spool(spool.root)
    assert sorted(p.name for p in spool.pending_dir.iterdir()) == ["kept"]


def test_a_put_killed_midway_leaves_no_entry(tmp_path: Path) -> None:
    """kill -9 while put() copies the report: nothing may appear under the task's name."""
    root = tmp_path / "spool"
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                from pathlib import Path
                from falcoria_worker.spool import Spool
                Spool(Path({str(root)!r})).put(
                    "t1", Path({str(fifo)!r}), project={PROJECT!r}, mode="insert", track_history=True
                )
                """
            ),
        ]
    )
    try:
        with fifo.open("wb") as writer:  # opens once the child is reading
            writer.write(sample_report()[:100])
            writer.flush()
            # The child is inside put() now, copying and waiting for the rest of the report.
            tmp = root / "pending"
            while not any(p.name.startswith(".tmp-t1-") for p in tmp.iterdir()):
                assert child.poll() is None, "put() ended before the report was complete"
            assert not (tmp / "t1").exists()
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    restarted = Spool(root)
    assert restarted.pending() == []
    assert not restarted.has("t1")
    assert list(restarted.pending_dir.iterdir()) == []


def test_stray_files_in_pending_are_not_entries(spool: Spool, report: Path) -> None:
    entry = _put(spool, "t1", report)
    (spool.pending_dir / "notes.txt").write_text("an operator's file")
    assert spool.pending() == [entry]
