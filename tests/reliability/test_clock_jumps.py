"""Clock jumps seen by one instance alone: its wall clock steps +1 h, then -1 h, then back, while scans
run, leases are renewed and swept, and uploads back off against a failing ScanLedger. The other instance
shares the Redis with an honest clock. libfaketime fakes the wall clock of that worker process only
(FAKETIME_DONT_FAKE_MONOTONIC=1 leaves the monotonic clock alone; nmap gets a clean environment, so it is
not faked either), stepped through FAKETIME_TIMESTAMP_FILE. Nothing is lost, duplicated, run twice at
once or leaked: the worker's deadlines run on the monotonic clock and leases on Redis's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.kit import (
    LIBFAKETIME,
    Figures,
    ProcessWatch,
    Run,
    faked_clock,
    leaked_keys,
    nmap_tasks_of,
    paced_scan,
    wait_clean,
    wait_served,
)
from tests.support.drive import scan_fields, wait_until

pytestmark = pytest.mark.reliability

TASKS = 12
# Each step holds for longer than LEASE_TTL (6 s here), so heartbeats and sweeps of both instances run
# inside it.
HOLD = 8.0


def stamped_ahead(run: Run, nodename: str) -> bool:
    return any(
        s.get("worker") == nodename and int(s.get("updated_at", "0")) > time.time() + 1800
        for s in run.states().values()
    )


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
def test_wall_clock_steps_of_one_instance_during_scans_leases_and_upload_backoff(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    redis_server,
    tmp_path: Path,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    offset = tmp_path / "faketime-offset"
    jumpy = worker_factory("1", ledger=scanledger, UPLOAD_BACKOFF_MAX="2", **faked_clock(offset)).start()
    honest = worker_factory("2", ledger=scanledger, UPLOAD_BACKOFF_MAX="2").start()
    workers = [jumpy, honest]
    run = Run(tasker, scanledger, redis_server)
    scanledger.fail_for(503, 10 * HOLD)  # uploads back off through every step
    for _ in range(TASKS):
        run.send(paced_scan(netns_lab.services))

    for step in ("+1h", "-1h", "+0"):
        wait_until(
            lambda: all(nmap_tasks_of(w) for w in workers) or run.delivered(),
            timeout=60,
            what="both instances scanning",
        )
        offset.write_text(f"{step}\n")
        figures.faults[f"wall clock step to {step}"] += 1
        if step == "+1h":
            # The faked process really sees the step (else the case proves nothing): the status it
            # writes for its scan is stamped an hour ahead.
            wait_until(lambda: stamped_ahead(run, jumpy.nodename), timeout=30, what="a status from +1 h")
        time.sleep(HOLD)
    scanledger.clear_faults()

    run.wait_delivered(timeout=240)
    wait_clean(tasker, redis_server.client())
    time.sleep(2)  # room for a wrong second upload
    run.settle(figures, watch)
    states = {t: s["state"] for t, s in run.states().items()}
    assert set(states.values()) == {"completed"}, states
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    assert figures.parallel_runs == 0, watch.parallel
    assert leaked_keys(tasker, redis_server.client()) == []
    # No lease was taken over: every task was scanned by one instance only.
    taken_over = {t: dirs for t, dirs in watch.nmap_tasks.items() if t in run.tasks and len(dirs) > 1}
    assert taken_over == {}, taken_over
    assert any(r.status == 503 for r in scanledger.rejections)
    wait_served(
        tasker, [w.nodename for w in workers], redis_server, scan_fields(netns_lab.services, "80"), scanledger
    )
    for worker in workers:
        assert worker.alive() and worker.exits == []
        assert "Traceback" not in worker.log()
        assert "lease lost" not in worker.log().lower()
