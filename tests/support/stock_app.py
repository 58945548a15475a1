"""A stock Celery app with the task names the worker serves, for side-by-side comparisons.

`celery -A tests.support.stock_app worker --pool threads` runs it; the broker URL comes from
FW_STOCK_BROKER_URL. The queue and exchanges are declared as Tasker declares them, so the stock worker
consumes exactly what ours consumes and `inspect active_queues` can be compared key for key.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Exchange, Queue
from kombu.common import Broadcast

from tests.support.tasker import CANCEL_EXCHANGE, SCAN_EXCHANGE, SCAN_QUEUE, SERVICE_EXCHANGE

app = Celery("tasker", broker=os.environ.get("FW_STOCK_BROKER_URL", "memory://"))
app.conf.update(
    task_queues=[
        Queue(SCAN_QUEUE, exchange=Exchange(SCAN_EXCHANGE, type="topic"), routing_key="nmap.scan"),
        Broadcast(name=CANCEL_EXCHANGE),
        Broadcast(name=SERVICE_EXCHANGE),
    ],
    task_routes={
        "project.nmap.scan": {"queue": SCAN_QUEUE},
        "project.nmap.cancel": {"queue": CANCEL_EXCHANGE},
        "worker.update_ip": {"queue": SERVICE_EXCHANGE},
    },
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
)


# Acked early, unlike Tasker's acks_late: the test broker's consumer_timeout (15 s) would otherwise close
# the channel of a worker whose scan outlasts it.
@app.task(name="project.nmap.scan", acks_late=False)
def scan(data: dict) -> str:
    # Takes the task's timeout, so `inspect active` catches it running; the test stops the worker cold.
    time.sleep(float(data.get("timeout", 0)))
    return "0 open ports; delivered"


@app.task(name="project.nmap.cancel")
def cancel(data: dict) -> None:
    return None


@app.task(name="worker.update_ip")
def update_ip() -> None:
    return None
