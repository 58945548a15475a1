"""Case 2: ScanLedger answers 503 for 30 s, then refuses connections for 30 s (longer if the scans take
longer: the outage ends only once all of them finished), while 20 scans finish on two instances; one
instance is restarted (SIGTERM, start) in the middle of the outage. Nothing is accepted during the
outage; afterwards every result is delivered from the spool exactly once."""

from __future__ import annotations

import time

import pytest

from tests.reliability.kit import Figures, ProcessWatch, Run, leaked_keys, wait_clean, wait_served
from tests.support.drive import scan_fields, wait_until

pytestmark = pytest.mark.reliability

TASKS = 20
HALF = 30.0  # seconds of 503, then as many of refused connections


def test_scanledger_503_then_refused_for_60_s_with_a_restart_in_the_middle(
    tasker, worker_factory, scanledger, netns_lab, redis_server, watch: ProcessWatch, figures: Figures
) -> None:
    # The spool retries with backoff capped at UPLOAD_BACKOFF_MAX (300 s by default); 3 s keeps the
    # recovery short. What is tested is that nothing is lost or doubled, not how soon it arrives.
    workers = [worker_factory(str(i), ledger=scanledger, UPLOAD_BACKOFF_MAX="3").start() for i in (1, 2)]
    run = Run(tasker, scanledger, redis_server)
    began = time.monotonic()
    scanledger.fail_for(503, HALF + 10)  # overlaps the refusal: no moment of service in between
    for _ in range(TASKS):
        run.send(scan_fields(netns_lab.services, "21,22,80"))

    wait_until(lambda: time.monotonic() - began >= HALF, timeout=HALF + 5, what="the 503 half")
    scanledger.refuse()
    workers[0].stop()  # the middle of the outage: results wait in the spool of a stopped instance
    figures.faults["instance restart (SIGTERM) mid-outage"] += 1
    workers[0].start()
    # However loaded the machine, every scan ends inside the outage: it lasts until they all have.
    wait_until(
        lambda: all(s.get("state") == "completed" for s in run.states().values()),
        timeout=10 * HALF,
        what="every scan finished during the outage",
    )
    wait_until(lambda: time.monotonic() - began >= 2 * HALF, timeout=2 * HALF, what="the refused half")
    assert scanledger.uploads == []  # nothing got through while ScanLedger was down
    answered_503 = sum(1 for r in scanledger.rejections if r.status == 503)
    figures.faults[f"ScanLedger 503 for {HALF:.0f} s ({answered_503} requests)"] += 1
    figures.faults[f"ScanLedger refusing connections for {HALF:.0f} s"] += 1
    scanledger.clear_faults()
    scanledger.resume()

    run.wait_delivered(timeout=120)
    wait_clean(tasker, redis_server.client())
    time.sleep(2)  # room for a wrong second upload of anything
    run.settle(figures, watch)
    assert answered_503 > 0
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    assert figures.parallel_runs == 0, watch.parallel
    assert leaked_keys(tasker, redis_server.client()) == []
    assert all(not list((w.state_dir / "spool").rglob("*.xml")) for w in workers)
    wait_served(
        tasker, [w.nodename for w in workers], redis_server, scan_fields(netns_lab.services, "80"), scanledger
    )
