"""Case 5: 1,000 small tasks queued at once to four instances on one host. Every task completes and is
uploaded exactly once, Redis ends clean, and each instance's resident memory while the last hundred tasks
complete is within 10% of what it was while the first hundred did."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.reliability.kit import Figures, ProcessWatch, Run, leaked_keys, wait_clean, wait_served
from tests.support.drive import scan_fields, wait_until

# A hang guard, not a timing: 1,000 tasks and the secret scan of every key take minutes on a busy machine.
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(1200)]

TASKS = 1000
INSTANCES = 4
WINDOW = 100


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_thousand_small_tasks_on_four_instances(
    tasker, worker_factory, scanledger, netns_lab, redis_server, watch: ProcessWatch, figures: Figures
) -> None:
    workers = [worker_factory(str(i), ledger=scanledger, LOGGER_LEVEL="INFO").start() for i in range(1, 5)]
    run = Run(tasker, scanledger, redis_server)
    samples: list[tuple[int, list[int]]] = []  # (uploads so far, RSS of each instance)
    done = threading.Event()

    def sample_memory() -> None:
        while not done.wait(0.2):
            samples.append((len(scanledger.uploads), [rss_kib(w.pid) for w in workers]))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    # One open port, phase 1 only: the smallest task that still produces and uploads a report.
    fields = scan_fields(netns_lab.services, "80", include_services=False)
    for _ in range(TASKS):
        run.send(fields)
    try:
        scanledger.wait_for(lambda f: len(f.uploads) >= TASKS, timeout=900)
    finally:
        done.set()
        sampler.join(5)
    wait_until(run.delivered, timeout=120, what="every task completed")
    wait_clean(tasker, redis_server.client(), timeout=60)
    time.sleep(2)
    run.settle(figures, watch)
    assert figures.lost == 0 and figures.duplicated == 0
    assert figures.parallel_runs == 0, watch.parallel
    assert leaked_keys(tasker, redis_server.client()) == []

    first = [rss for count, rss in samples if count < WINDOW]
    last = [rss for count, rss in samples if count >= TASKS - WINDOW]
    assert first and last, f"{len(first)} and {len(last)} memory samples"
    for i, worker in enumerate(workers):
        before = sum(s[i] for s in first) / len(first)
        after = sum(s[i] for s in last) / len(last)
        figures.notes.append(
            f"{worker.nodename.split('@')[0]} RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB"
        )
        assert after <= before * 1.10, f"{worker.nodename}: RSS {before:.0f} KiB -> {after:.0f} KiB"
    wait_served(tasker, [w.nodename for w in workers], redis_server, fields, scanledger)
