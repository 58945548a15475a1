"""Case 1: SIGKILL of the worker's main process and of its nmap, alternately, at random moments of 20
running scans on two instances. Every task is uploaded exactly once, never runs on two instances at the
same moment, Redis ends clean and both instances still serve."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import pytest

from tests.reliability.kit import (
    Figures,
    ProcessWatch,
    Run,
    leaked_keys,
    nmap_tasks_of,
    paced_scan,
    seeded_random,
    wait_clean,
    wait_served,
)
from tests.support.drive import scan_fields, wait_until

pytestmark = pytest.mark.reliability

TASKS = 20
FAULTS = 10  # five of each kind


def test_sigkill_main_and_scan_process_at_random_moments(
    tasker, worker_factory, scanledger, netns_lab, redis_server, watch: ProcessWatch, figures: Figures
) -> None:
    # MAX_ATTEMPTS above the faults one task can take, so that no task is (rightly) given up as poison.
    workers = [worker_factory(str(i), ledger=scanledger, MAX_ATTEMPTS="8").start() for i in (1, 2)]
    run = Run(tasker, scanledger, redis_server)
    for _ in range(TASKS):
        run.send(paced_scan(netns_lab.services))
    rng = seeded_random(figures)

    for fault in range(FAULTS):
        victims: list[tuple[Any, dict[int, str]]] = []

        def scanning(victims: list = victims) -> bool:
            victims[:] = [(w, t) for w in workers if (t := nmap_tasks_of(w))]
            return bool(victims) or run.delivered()

        wait_until(scanning, timeout=60, what="a running scan to break")
        if not victims:
            figures.notes.append(f"all tasks done after {fault} faults")
            break
        worker, _tasks = rng.choice(victims)
        time.sleep(rng.uniform(0.0, 2.0))  # a random moment of the scan (or just after it)
        if fault % 2 == 0:
            worker.kill()  # its nmap group outlives it, as under a crash; the restart must stop it
            figures.faults["SIGKILL main process"] += 1
            worker.start()
        else:
            pids = worker.nmap_pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            figures.faults["SIGKILL nmap" if pids else "SIGKILL nmap (scan had just ended)"] += 1

    run.wait_delivered(timeout=240)
    wait_clean(tasker, redis_server.client())
    time.sleep(2)  # a late second upload would come from the spool's next pass: give it the chance
    run.settle(figures, watch)
    states = {t: s["state"] for t, s in run.states().items()}
    assert set(states.values()) == {"completed"}, states
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    assert figures.parallel_runs == 0, watch.parallel
    assert leaked_keys(tasker, redis_server.client()) == []
    wait_served(
        tasker, [w.nodename for w in workers], redis_server, scan_fields(netns_lab.services, "80"), scanledger
    )
    for worker in workers:
        assert "Traceback" not in worker.log()
