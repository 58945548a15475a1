"""A full disk: STATE_DIR on a small tmpfs that fills up during phase 2 and during spooling. The task is
handed back with a reason that names the disk, no half-written report is uploaded or kept, the spool stays
readable, and the instance goes on by itself once space returns."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from falcoria_worker.errors import DiskFull
from falcoria_worker.spool import Spool
from tests.fakes.scanledger import check_report
from tests.reliability.kit import Figures, ProcessWatch, Run, leaked_keys, paced_scan, wait_clean
from tests.support.drive import status, wait_until

pytestmark = pytest.mark.reliability

TASKS = 3


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted again after the case."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write until the filesystem has not one byte left; returns the filler to delete when space should
    return."""
    filler = disk / "filler"
    with filler.open("ab", buffering=0) as out:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
    return filler


class Hog(threading.Thread):
    """Another program filling the disk and taking every byte freed, until stopped (then its file goes)."""

    def __init__(self, disk: Path) -> None:
        super().__init__(daemon=True, name="disk-hog")
        self.disk = disk
        self.full = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            fill(self.disk)
            self.full.set()
            self._halt.wait(0.005)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        (self.disk / "filler").unlink()


def test_spool_put_on_a_full_disk_leaves_no_trace_and_works_once_space_returns(
    small_disk: Path, tmp_path: Path, figures: Figures
) -> None:
    report = tmp_path / "report.xml"
    report.write_bytes(b"<nmaprun>" + b"x" * 300_000 + b"</nmaprun>")
    spool = Spool(small_disk / "spool")
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    spool.put(first, report, project="p", mode="insert", track_history=True)
    filler = fill(small_disk)
    with pytest.raises(DiskFull, match="no space left on the disk"):
        spool.put(second, report, project="p", mode="insert", track_history=True)
    figures.faults["disk full during spooling"] += 1
    leftovers = [p.name for p in (small_disk / "spool" / "pending").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    [entry] = Spool(spool.root).pending()  # as a restarted worker reads it: intact
    assert entry.task_id == first and entry.xml.read_bytes() == report.read_bytes()
    assert not spool.has(second)
    filler.unlink()
    spool.put(second, report, project="p", mode="insert", track_history=True)
    assert [e.task_id for e in Spool(spool.root).pending()] == [first, second]
    figures.tasks += 2


def test_disk_fills_during_phase_2(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    redis_server,
    small_disk: Path,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    # Each hand-back counts an attempt; room for the ones made while the disk stays full.
    worker = worker_factory("1", ledger=scanledger, STATE_DIR=str(small_disk / "state"), MAX_ATTEMPTS="50")
    (small_disk / "state").mkdir()
    worker.state_dir = small_disk / "state"
    worker.start()
    run = Run(tasker, scanledger, redis_server)
    first = run.send(paced_scan(netns_lab.services))
    wait_until(
        lambda: status(redis_server, first).get("state") == "service_scan" and worker.nmap_pids(),
        timeout=60,
        what="phase 2 running",
    )
    hog = Hog(small_disk)
    hog.start()
    hog.full.wait(30)
    figures.faults["disk full during phase 2"] += 1
    # While the disk stays full the task keeps coming back (each hand-back is a new delivery and claim);
    # watch it through three claims: handed back each time naming the disk, never failed.
    seen: list[dict[str, str]] = []
    r = redis_server.client()

    def three_claims_or_failed() -> bool:
        seen.append(status(redis_server, first))
        attempts = int(r.hget(f"fw:lease:{first}", "attempts") or 0)
        return seen[-1].get("state") == "failed" or attempts >= 3

    wait_until(three_claims_or_failed, timeout=120, what="three claims of the task on a full disk")
    assert [s for s in seen if s.get("state") == "failed"] == []
    handed_back = [
        line
        for line in worker.log().splitlines()
        if first in line and "no space left on the disk" in line and "STATE_DIR" in line
    ]
    assert len(handed_back) >= 2, worker.log()[-3000:]
    for _ in range(TASKS - 1):
        run.send(paced_scan(netns_lab.services))
    hog.stop()  # space returns; nobody restarts anything

    run.wait_delivered(timeout=180)
    wait_clean(tasker, redis_server.client())
    run.settle(figures, watch)
    assert {s["state"] for s in run.states().values()} == {"completed"}, run.states()
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    for upload in scanledger.uploads:
        assert check_report(upload.xml) == [netns_lab.services.ip]  # whole reports only
    assert leaked_keys(tasker, redis_server.client()) == []
    assert worker.alive() and worker.exits == []
    assert "Traceback" not in worker.log()
