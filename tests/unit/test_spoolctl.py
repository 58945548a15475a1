"""`falcoria-worker spool`: listing, re-driving and dropping entries, and every refusal that keeps a
report from being lost or buried (real files; the command run through cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falcoria_worker import cli
from falcoria_worker.spool import Spool, SpoolEntry, SpoolRefused
from tests.fakes.scanledger import sample_report

PROJECT = "5f0c6f9e-3a51-4c1e-9d7e-2b2f0f4b6a11"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.fixture
def report(tmp_path: Path) -> Path:
    path = tmp_path / "merged.xml"
    path.write_bytes(sample_report())
    return path


def _put(spool: Spool, task_id: str, report: Path) -> SpoolEntry:
    return spool.put(task_id, report, project=PROJECT, mode="insert", track_history=True)


def _failed(spool: Spool, task_id: str, report: Path, reason: str = "ScanLedger answered 404") -> None:
    spool.fail(_put(spool, task_id, report), reason)


def run(spool: Spool, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["spool", *args, "--set", f"STATE_DIR={spool.root.parent}"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_shows_pending_and_failed_with_the_reason(spool: Spool, report: Path, capsys) -> None:
    _put(spool, "task-a", report)
    _failed(spool, "task-b", report)
    code, out, _ = run(spool, "list", capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["STATE", "NAME", "CREATED", "MODE", "BYTES", "REASON"]
    assert lines[1].split()[:2] == ["pending", "task-a"]
    assert lines[2].split()[:2] == ["failed", "task-b"]
    assert lines[2].endswith("ScanLedger answered 404")


def test_list_json(spool: Spool, report: Path, capsys) -> None:
    _failed(spool, "task-b", report)
    _failed(spool, "task-b", report, "again")  # the same task refused twice: both kept
    code, out, _ = run(spool, "list", "--json", capsys=capsys)
    assert code == 0
    doc = json.loads(out)
    assert [(e["state"], e["name"], e["task_id"], e["reason"]) for e in doc["entries"]] == [
        ("failed", "task-b", "task-b", "ScanLedger answered 404"),
        ("failed", "task-b+1", "task-b", "again"),
    ]
    assert doc["entries"][0]["size"] == len(sample_report())


def test_show(spool: Spool, report: Path, capsys) -> None:
    _failed(spool, "task-b", report)
    code, out, _ = run(spool, "show", "task-b", capsys=capsys)
    assert code == 0
    assert f"project:       {PROJECT}" in out
    assert "reason:        ScanLedger answered 404" in out
    assert run(spool, "show", "nope", capsys=capsys)[0] == 1


def test_retry_moves_a_failed_entry_back_to_pending(spool: Spool, report: Path, capsys) -> None:
    _failed(spool, "task-b", report)
    code, out, _ = run(spool, "retry", "task-b", capsys=capsys)
    assert code == 0 and "pending again as task-b" in out
    [entry] = spool.pending()
    assert entry.task_id == "task-b" and entry.xml.read_bytes() == sample_report()
    assert not (entry.xml.parent / "reason.txt").exists()
    assert list(spool.failed_dir.iterdir()) == []


def test_retry_of_a_second_failure_goes_back_under_the_task_id(spool: Spool, report: Path) -> None:
    _failed(spool, "task-b", report)
    _failed(spool, "task-b", report)
    assert spool.requeue("task-b+1").task_id == "task-b"
    # The first failure of the same task would now replace the pending one: refused, kept.
    with pytest.raises(SpoolRefused, match="pending with another report"):
        spool.requeue("task-b")
    assert (spool.failed_dir / "task-b" / "nmap_report.xml").exists()


def test_retry_refuses_what_would_only_fail_again_or_is_pending(spool: Spool, report: Path) -> None:
    _put(spool, "task-a", report)
    with pytest.raises(SpoolRefused, match="pending already"):
        spool.requeue("task-a")
    _failed(spool, "task-c", report)
    (spool.failed_dir / "task-c" / "nmap_report.xml").unlink()
    with pytest.raises(SpoolRefused, match=r"nmap_report\.xml is missing"):
        spool.requeue("task-c")
    _failed(spool, "task-d", report)
    (spool.failed_dir / "task-d" / "meta.json").write_text("{")
    with pytest.raises(SpoolRefused, match=r"meta\.json unreadable"):
        spool.requeue("task-d")
    with pytest.raises(SpoolRefused, match="no spool entry"):
        spool.requeue("../task-d")
    assert {p.name for p in spool.failed_dir.iterdir()} == {"task-c", "task-d"}


def test_retry_all_reports_refusals_and_exits_1(spool: Spool, report: Path, capsys) -> None:
    _failed(spool, "task-b", report)
    _failed(spool, "task-b", report)
    code, out, err = run(spool, "retry", "--all", capsys=capsys)
    assert code == 1
    assert "task-b: pending again" in out
    assert "refused: task-b+1 cannot be retried: task task-b is pending" in err


def test_drop_asks_without_yes_and_refuses_without_a_terminal(spool: Spool, report: Path, capsys) -> None:
    _failed(spool, "task-b", report)
    code, _, err = run(spool, "drop", "task-b", capsys=capsys)
    assert code == 1 and "give --yes" in err
    assert (spool.failed_dir / "task-b").is_dir()


def test_drop_confirmed_interactively(spool: Spool, report: Path, capsys, monkeypatch) -> None:
    _failed(spool, "task-b", report)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda _prompt: "n")
    assert run(spool, "drop", "task-b", capsys=capsys)[0] == 1
    assert (spool.failed_dir / "task-b").is_dir()
    monkeypatch.setattr("builtins.input", lambda _prompt: "y")
    assert run(spool, "drop", "task-b", capsys=capsys)[0] == 0
    assert list(spool.failed_dir.iterdir()) == []


def test_drop_refuses_pending_unless_asked(spool: Spool, report: Path, capsys) -> None:
    _put(spool, "task-a", report)
    _failed(spool, "task-b", report)
    code, _, err = run(spool, "drop", "task-a", "task-b", "--yes", capsys=capsys)
    assert code == 1 and "task-a pending, not failed" in err
    assert len(spool.held()) == 2  # nothing dropped: refusal comes before any deletion
    code, out, _ = run(spool, "drop", "task-a", "task-b", "--yes", "--pending", capsys=capsys)
    assert code == 0 and "task-a: dropped (pending" in out
    assert spool.held() == []


def test_drop_all_failed(spool: Spool, report: Path, capsys) -> None:
    _put(spool, "task-a", report)
    _failed(spool, "task-b", report)
    _failed(spool, "task-c", report)
    assert run(spool, "drop", "--all-failed", "--yes", capsys=capsys)[0] == 0
    assert [h.name for h in spool.held()] == ["task-a"]


def test_the_command_line_never_removes_a_put_in_progress(spool: Spool, report: Path, capsys) -> None:
    (spool.pending_dir / ".tmp-task-z-0000").mkdir()  # a worker writing an entry right now
    assert run(spool, "list", capsys=capsys)[0] == 0
    assert (spool.pending_dir / ".tmp-task-z-0000").is_dir()


def test_no_spool_is_an_error_not_a_new_directory(tmp_path: Path, capsys) -> None:
    code = cli.main(["spool", "list", "--set", f"STATE_DIR={tmp_path / 'none'}"])
    assert code == 1 and "no spool at" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
