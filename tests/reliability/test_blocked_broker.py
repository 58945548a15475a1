"""A blocked broker: RabbitMQ's memory alarm (`set_vm_memory_high_watermark 0`) blocks every publisher
(`connection.blocked`) while two instances scan and one of them is stopped, so it must hand its task back
to a broker that does not read. Neither instance hangs its loop (both keep feeding the watchdog through
the alarm), the stopped one exits within the unit's stop timeout, and once the alarm clears every task is
delivered exactly once."""

from __future__ import annotations

import time

import pytest

from tests.reliability.kit import (
    Figures,
    ProcessWatch,
    Run,
    leaked_keys,
    nmap_tasks_of,
    paced_scan,
    wait_clean,
    wait_served,
)
from tests.support.drive import scan_fields, wait_until

pytestmark = pytest.mark.reliability

TASKS = 8
HOLD = 8.0  # seconds of alarm before the stop: longer than LEASE_TTL (6 s here)


def watchdogs(worker) -> int:
    return sum(1 for line in worker.notify.lines() if line == "WATCHDOG=1")


def test_memory_alarm_while_an_instance_hands_back(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    redis_server,
    rabbitmq,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    workers = [worker_factory(str(i), ledger=scanledger, WATCHDOG_USEC="4000000").start() for i in (1, 2)]
    run = Run(tasker, scanledger, redis_server)
    for _ in range(TASKS):
        run.send(paced_scan(netns_lab.services))
    wait_until(lambda: all(nmap_tasks_of(w) for w in workers), timeout=60, what="both instances scanning")
    try:
        rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "0")
        figures.faults["memory alarm (publishers blocked)"] += 1
        fed = [watchdogs(w) for w in workers]
        time.sleep(HOLD)  # scans finish and are uploaded meanwhile; a publish would meet the alarm
        # Both loops went on through the alarm: they kept feeding their watchdogs.
        assert all(watchdogs(w) > n + 2 for w, n in zip(workers, fed, strict=True))
        # It hands its scan back to the blocked broker, within the unit's TimeoutStopSec=30s.
        wait_until(lambda: nmap_tasks_of(workers[0]), timeout=60, what="instance 1 scanning")
        rc = workers[0].stop(timeout=30)
        figures.faults["SIGTERM during the alarm"] += 1
        assert rc == 0, workers[0].log()[-3000:]
    finally:
        rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
    workers[0].start()

    run.wait_delivered(timeout=240)
    wait_clean(tasker, redis_server.client())
    time.sleep(2)  # room for a wrong second upload
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
        assert worker.alive()
        assert "Traceback" not in worker.log()
