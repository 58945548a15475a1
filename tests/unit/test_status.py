"""`falcoria-worker status`: the status file an instance keeps, and the view that joins it with systemd."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from falcoria_worker.lifecycle import Event, new_task, step
from falcoria_worker.model import Phase, parse_task
from falcoria_worker.spool import Spool
from falcoria_worker.status import StatusFile, gather, parse_show, render, status_path, write_atomically

TASK = {
    "ip": "127.0.0.1",
    "hostnames": [],
    "project": "00000000-0000-0000-0000-000000000001",
    "open_ports_opts": "-Pn -p 80",
    "service_opts": "-sV -Pn",
    "timeout": 60,
    "include_services": True,
    "mode": "append",
    "user": {"id": "00000000-0000-0000-0000-000000000002", "username": "t"},
    "open_ports_str": "80",
}


def running_view(task_id: str = "t-1"):
    view = replace(new_task(task_id), task=parse_task(TASK))
    for event in (Event.RECEIVED, Event.LEASED, Event.ADMITTED):
        view = step(view, event, 100.0).view
    return view


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_status_file_follows_the_instance_and_its_tasks(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (spool.failed_dir / "t-old").mkdir()
    path = tmp_path / "status.json"
    status = StatusFile(path, instance="3", spool=spool, clock=lambda: 1000.0)
    status.worker_started()
    assert read(path)["state"] == "starting"
    status.worker_ready()
    status.consuming_changed(True)

    view = running_view()
    moved = step(view, Event.PHASE_STARTED, 101.0, phase=Phase.PORTS, detail="open ports")
    status.observe(moved)
    status.observe(step(moved.view, Event.PROGRESS, 102.0, percent=42.25))
    doc = read(path)
    assert (doc["instance"], doc["state"], doc["consuming"], doc["started_at"]) == (
        "3",
        "ready",
        True,
        1000.0,
    )
    assert doc["tasks"] == {
        "t-1": {
            "target": "127.0.0.1",
            "phase": "ports_scan",
            "percent": 42.2,
            "detail": "open ports",
            "started_at": 100.0,
        }
    }
    assert doc["spool"] == {"pending": 0, "failed": 1}
    assert doc["last_error"] is None

    failed = step(moved.view, Event.FAILED, 103.0, error="nmap exited with status 1")
    status.observe(failed)
    doc = read(path)
    assert doc["tasks"] == {}
    assert doc["last_error"] == {"at": 103.0, "task_id": "t-1", "error": "nmap exited with status 1"}
    status.worker_stopping()
    assert read(path)["state"] == "stopping"


def test_our_own_stop_and_a_cancel_are_not_errors(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    status = StatusFile(path, instance="1", spool=None)
    stopping = step(running_view(), Event.STOPPING, 1.0)
    status.observe(step(stopping.view, Event.CANCELLED, 2.0, error="stopped"))
    status.observe(step(running_view("t-2"), Event.CANCELLED, 3.0, error="cancelled by Tasker"))
    doc = read(path)
    assert doc["last_error"] is None
    assert doc["spool"] is None


def test_the_file_is_replaced_whole_and_readable_by_the_group(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomically(tmp_path / "status.json", b"{}")
        write_atomically(tmp_path / "status.json", b'{"a": 1}')
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "status.json").stat().st_mode) == 0o640
    assert read(tmp_path / "status.json") == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_status_path_prefers_the_runtime_directory(tmp_path: Path) -> None:
    assert status_path(tmp_path, {"RUNTIME_DIRECTORY": "/run/falcoria-worker/2"}) == Path(
        "/run/falcoria-worker/2/status.json"
    )
    assert status_path(tmp_path, {}) == tmp_path / "status.json"


SHOW = """Id=falcoria-worker@1.service
ActiveState=active
SubState=running
StatusText=scanning 10.250.0.2: open ports 40%
ActiveEnterTimestamp=Mon 2026-11-30 10:00:00 UTC
MainPID=100

Id=falcoria-worker@2.service
ActiveState=failed
SubState=failed
StatusText=
ActiveEnterTimestamp=
MainPID=0
"""


def test_gather_joins_systemd_and_the_files_and_ignores_stale_files() -> None:
    units = parse_show(SHOW)
    assert [u["Id"] for u in units] == ["falcoria-worker@1.service", "falcoria-worker@2.service"]
    doc = {
        "state": "ready",
        "started_at": 10.0,
        "consuming": False,
        "tasks": {"t-1": {"target": "10.250.0.2", "phase": "ports_scan", "percent": 40.0}},
        "spool": {"pending": 2, "failed": 1},
        "last_error": {"at": 50.0, "task_id": "t-0", "error": "rejected: --script"},
    }
    rows = gather(units, {"1": doc, "2": {**doc, "state": "stopping"}})
    assert [r["instance"] for r in rows] == ["1", "2"]
    assert rows[0]["state"] == "ready" and rows[0]["tasks"][0]["task_id"] == "t-1"
    assert "state" not in rows[1]  # its file is left from before it failed
    assert rows[1]["active"] == "failed"

    text = render(rows, now=3610.0)
    lines = text.splitlines()
    assert lines[0].split() == ["INSTANCE", "SYSTEMD", "STATE", "UP", "SCANS", "SPOOL", "STATUS"]
    assert lines[1].split()[:5] == ["1", "active/running", "ready", "1h00m", "1"]
    assert "2 pending, 1 failed" in lines[1]
    assert "scanning 10.250.0.2: open ports 40%" in lines[1]
    assert lines[2].split() == ["10.250.0.2", "ports_scan", "40%", "task", "t-1"]
    assert lines[3].strip().startswith("last error (59m20s ago): rejected: --script")
    assert lines[4].split()[:3] == ["2", "failed/failed", "-"]


def test_an_instance_run_by_hand_shows_from_its_file_alone() -> None:
    rows = gather([], {"7": {"state": "ready", "started_at": 0.0, "tasks": {}}})
    assert rows[0]["unit"] is None and rows[0]["state"] == "ready"
    assert render([], 0.0) == "no falcoria-worker instances on this host"


def test_an_unwritable_status_file_is_reported_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = StatusFile(tmp_path / "missing" / "status.json", instance="1", spool=None)
    status.worker_started()
    status.worker_ready()
    assert caplog.text.count("cannot write the status file") == 1
