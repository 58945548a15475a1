"""Case 4: a scan longer than the broker's consumer_timeout (15 s on the test broker, 30 min in
production) with two more tasks queued behind it. The broker never closes the channel, the running
task's message is not held unacked, the queued ones wait as ready messages, and each task is uploaded
exactly once."""

from __future__ import annotations

import time

import pytest

from tests.reliability.kit import Figures, ProcessWatch, Run, leaked_keys, wait_clean, wait_served
from tests.support.drive import scan_fields, status, wait_until
from tests.support.services import CONSUMER_TIMEOUT_MS
from tests.support.tasker import SCAN_QUEUE

pytestmark = pytest.mark.reliability


def queue_counts(rabbitmq) -> tuple[int, int]:
    """(ready, unacknowledged) messages of the scan queue, as the broker sees them."""
    out = rabbitmq.rabbitmqctl(
        "-q", "list_queues", "-p", rabbitmq.vhost, "name", "messages_ready", "messages_unacknowledged"
    ).stdout
    for line in out.splitlines():
        name, ready, unacked = line.split()
        if name == SCAN_QUEUE:
            return int(ready), int(unacked)
    raise AssertionError(f"no {SCAN_QUEUE} in {out!r}")


def test_scan_longer_than_consumer_timeout(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    redis_server,
    rabbitmq,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    run = Run(tasker, scanledger, redis_server)
    # 1000 probes 25 ms apart: about 25 s of phase 1, longer than the 15 s consumer_timeout.
    long_fields = scan_fields(
        netns_lab.services, "1-1000", open_ports_opts="-n -Pn --scan-delay 25ms -p 1-1000"
    )
    long_task = run.send(long_fields, include_services=False)
    queued = [run.send(scan_fields(netns_lab.services, "21,22")) for _ in range(2)]
    wait_until(lambda: status(redis_server, long_task).get("state") == "ports_scan", what="the long scan")
    began = time.monotonic()
    # While it runs the broker holds no unacked message, and the queued tasks wait there for a free slot.
    assert queue_counts(rabbitmq) == (2, 0)
    wait_until(
        lambda: status(redis_server, long_task).get("state") == "completed", timeout=180, what="long scan"
    )
    lasted = time.monotonic() - began
    figures.faults[f"scan of {lasted:.0f} s > consumer_timeout {CONSUMER_TIMEOUT_MS / 1000:.0f} s"] += 1
    assert lasted > CONSUMER_TIMEOUT_MS / 1000, "precondition: the scan must outlast consumer_timeout"
    run.wait_delivered(timeout=120)
    wait_clean(tasker, redis_server.client())
    time.sleep(2)
    run.settle(figures, watch)
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    assert all(status(redis_server, t)["state"] == "completed" for t in queued)
    assert leaked_keys(tasker, redis_server.client()) == []
    log = worker.log()
    assert "PRECONDITION_FAILED" not in log and "connection problem" not in log
    assert worker.alive() and worker.exits == []
    wait_served(tasker, [worker.nodename], redis_server, scan_fields(netns_lab.services, "80"), scanledger)
