"""Case 3: RabbitMQ, and separately Redis, stopped and started again while two instances scan. No task is
lost, none runs on two instances at once, both instances reconnect by themselves, and from the moment an
instance reports the outage until the service is back its sd_notify STATUS says so and nothing else."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.kit import (
    Figures,
    ProcessWatch,
    Run,
    first_status_at,
    leaked_keys,
    nmap_tasks_of,
    paced_scan,
    statuses_between,
    wait_clean,
    wait_served,
)
from tests.support.drive import scan_fields, wait_until

pytestmark = pytest.mark.reliability

TASKS = 10
# Seconds the service stays down after every instance has reported the outage: longer than a scan, so
# scans finish (and results are spooled and uploaded) during it, and longer than LEASE_TTL (6 s here).
HOLD = 8.0


def _outage_during_scans(
    *,
    tasker,
    workers,
    run: Run,
    stop: Callable[[], None],
    start: Callable[[], None],
    says_outage: Callable[[str], bool],
    figures: Figures,
    fault: str,
) -> None:
    wait_until(lambda: all(nmap_tasks_of(w) for w in workers), timeout=60, what="both instances scanning")
    stopped = time.monotonic()
    stop()
    reported = [first_status_at(w, says_outage, stopped) for w in workers]
    time.sleep(HOLD)  # the outage goes on while scans run and finish
    back = time.monotonic()
    start()
    figures.faults[fault] += 1
    for worker, since in zip(workers, reported, strict=True):
        during = statuses_between(worker, since, back)
        lies = [text for text in during if not says_outage(text)]
        assert lies == [], f"{worker.nodename} STATUS during the outage: {lies}"
        # ... and it stops saying so once it has reconnected by itself
        first_status_at(worker, lambda text: not says_outage(text), back)


def _check(run: Run, tasker, workers, redis_server, netns_lab, watch: ProcessWatch, figures: Figures) -> None:
    run.wait_delivered(timeout=180)
    wait_clean(tasker, redis_server.client())
    time.sleep(2)  # room for a wrong second upload
    run.settle(figures, watch)
    states = {t: s["state"] for t, s in run.states().items()}
    assert set(states.values()) == {"completed"}, states
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    assert figures.parallel_runs == 0, watch.parallel
    assert leaked_keys(tasker, redis_server.client()) == []
    wait_served(
        tasker, [w.nodename for w in workers], redis_server, scan_fields(netns_lab.services, "80"), run.ledger
    )
    for worker in workers:
        assert worker.alive() and worker.exits == []
        assert "Traceback" not in worker.log()


def test_rabbitmq_restarted_during_scans(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    redis_server,
    rabbitmq,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    workers = [worker_factory(str(i), ledger=scanledger).start() for i in (1, 2)]
    run = Run(tasker, scanledger, redis_server)
    for _ in range(TASKS):
        run.send(paced_scan(netns_lab.services))
    _outage_during_scans(
        tasker=tasker,
        workers=workers,
        run=run,
        stop=rabbitmq.stop,
        start=rabbitmq.start,
        says_outage=lambda text: text.startswith("reconnecting to RabbitMQ"),
        figures=figures,
        fault="RabbitMQ stop + start",
    )
    tasker.close_amqp()  # its connection died with the broker; the next publish opens a new one
    _check(run, tasker, workers, redis_server, netns_lab, watch, figures)


def test_redis_restarted_during_scans(
    tasker, worker_factory, scanledger, netns_lab, redis_server, watch: ProcessWatch, figures: Figures
) -> None:
    workers = [worker_factory(str(i), ledger=scanledger).start() for i in (1, 2)]
    run = Run(tasker, scanledger, redis_server)
    for _ in range(TASKS):
        run.send(paced_scan(netns_lab.services))
    _outage_during_scans(
        tasker=tasker,
        workers=workers,
        run=run,
        # A production Redis persists; without keep_data Tasker's own keys would vanish with it.
        stop=lambda: redis_server.stop(keep_data=True),
        start=redis_server.start,
        says_outage=lambda text: text.startswith("waiting for Redis"),
        figures=figures,
        fault="Redis stop + start (data kept)",
    )
    _check(run, tasker, workers, redis_server, netns_lab, watch, figures)


def test_status_reports_a_redis_outage_a_scan_already_hit(
    tasker, worker_factory, scanledger, netns_lab, redis_server, figures: Figures
) -> None:
    worker = worker_factory(ledger=scanledger, LEASE_TTL="120").start()
    run = Run(tasker, scanledger, redis_server)
    run.send(paced_scan(netns_lab.services))
    wait_until(lambda: nmap_tasks_of(worker), timeout=60, what="the scan")
    redis_server.stop(keep_data=True)
    figures.faults["Redis stop + start (data kept)"] += 1
    try:
        wait_until(
            lambda: "Redis unavailable" in worker.log(), timeout=60, what="the scan hitting the outage"
        )
        seen = time.monotonic()
        time.sleep(2.0)  # some twenty STATUS updates of the loop
        told = statuses_between(worker, seen, time.monotonic())
    finally:
        redis_server.start()
    assert told and all(text.startswith("waiting for Redis") for text in told), sorted(set(told))
