"""Observers: what the Celery events and the Prometheus textfile cost per task, measured by walking
tasks through the lifecycle's stages (the ~10 transitions of a two-phase scan) with each
observer alone. Events go over kombu's in-memory transport (the broker's own latency is not ours);
the metrics are written to a temporary directory once per task, as the loop's tick writes them (at
most once per turn, whatever the number of transitions). It needs no lab service."""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from kombu import Connection

from bench.lab import Lab
from bench.report import Result
from falcoria_worker.celery_events import CeleryEvents
from falcoria_worker.metrics import Metrics
from falcoria_worker.model import parse_task
from tests.support.lifecycle_walk import Life

GOAL_MS = 50.0  # the per-task overhead budget of the whole worker (bench/overhead.py)


def _task() -> object:
    return parse_task(
        {
            "ip": "127.0.0.1",
            "hostnames": [],
            "project": str(uuid.uuid4()),
            "open_ports_opts": "-p 1-1024",
            "service_opts": "-sV",
            "timeout": 600,
            "include_services": True,
            "mode": "insert",
            "user": {"id": str(uuid.uuid4()), "username": "bench"},
            "open_ports_str": "",
            "track_history": True,
        }
    )


def _per_task_ms(observer: object, tasks: int) -> float:
    task = _task()
    start = time.perf_counter()
    for _ in range(tasks):
        Life([observer], str(uuid.uuid4()), task).scan(open_ports=3)
        if isinstance(observer, Metrics):
            observer.tick()
    return (time.perf_counter() - start) * 1000 / tasks


def run(_lab: Lab, quick: bool) -> Result:
    tasks = 50 if quick else 500
    result = Result("observers", "Observers: Celery events and textfile metrics per task", quick)
    result.headers = ["observer", "ms per task (7 transitions)"]
    events = CeleryEvents(lambda: Connection("memory://"), "bench@localhost", task_events=True)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Metrics(Path(tmp), "bench", "0")
        figures = {"Celery events": _per_task_ms(events, tasks), "metrics file": _per_task_ms(metrics, tasks)}
    events.close()
    for name, ms in figures.items():
        result.rows.append([name, f"{ms:.2f}"])
    total = sum(figures.values())
    goal = f"events + metrics per task within the {GOAL_MS:.0f} ms budget"
    result.goal(goal, f"{total:.2f} ms", total < GOAL_MS)
    return result
