"""`falcoria-worker status` against a real worker: its status file while a scan runs, and after its stop."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.support.drive import slow_phase1, wait_phase, wait_until
from tests.support.tasker import Tasker
from tests.support.workerproc import REPO_ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def tasker(clean_broker, redis_server) -> Iterator[Tasker]:
    redis_server.flush()
    t = Tasker(clean_broker, redis_server.client())
    yield t
    t.close()


def status_json(runtime_root) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "falcoria_worker", "status", "--json", "--runtime-root", str(runtime_root)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    ).stdout
    return [row for row in json.loads(out) if row["unit"] is None]  # the test's, not the host's units


def test_status_shows_the_running_scan_and_the_spool(
    tasker, worker_factory, scanledger, netns_lab, redis_server, tmp_path
) -> None:
    runtime = tmp_path / "run" / "1"
    runtime.mkdir(parents=True)
    worker = worker_factory(ledger=scanledger, RUNTIME_DIRECTORY=str(runtime)).start()
    wait_until(lambda: json.loads((runtime / "status.json").read_text())["state"] == "ready", what="ready")

    task_id = tasker.send_scan(**slow_phase1(netns_lab.blackhole), project=uuid.UUID(scanledger.project))
    wait_phase(redis_server, task_id, "ports_scan", worker)
    wait_until(lambda: status_json(tmp_path / "run")[0].get("tasks"), what="task in the status file")
    (row,) = status_json(tmp_path / "run")
    assert row["instance"] == "1" and row["state"] == "ready"
    (task,) = row["tasks"]
    assert (task["task_id"], task["target"], task["phase"]) == (task_id, netns_lab.blackhole.ip, "ports_scan")
    assert row["spool"] == {"pending": 0, "failed": 0}
    assert row["started_at"] > 0
    assert oct((runtime / "status.json").stat().st_mode & 0o777) == "0o640"

    table = subprocess.run(
        [sys.executable, "-m", "falcoria_worker", "status", "--runtime-root", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    ).stdout
    assert f"{netns_lab.blackhole.ip}  ports_scan" in table

    tasker.cancel([task_id])
    wait_until(lambda: status_json(tmp_path / "run")[0]["tasks"] == [], what="task gone from the status file")
    assert worker.stop(timeout=20) == 0
    assert status_json(tmp_path / "run")[0]["state"] == "stopping"
