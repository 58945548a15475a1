"""Walks a task through the real lifecycle (`lifecycle.step`) and hands each transition to observers:
what the loop, admission and the scan thread do to a record, without a broker, Redis or nmap."""

from __future__ import annotations

import time
from typing import Any

from falcoria_worker.lifecycle import Event, Transition, new_task, step
from falcoria_worker.model import Phase, ScanTask
from falcoria_worker.protocol import SCAN_TASK, Delivery


class Life:
    def __init__(self, observers: list[Any], task_id: str, task: ScanTask | None, delivery: Any = None):
        self.observers = observers
        if delivery is None and task is not None:
            delivery = Delivery(
                body="", headers={}, properties={}, task_id=task_id, name=SCAN_TASK, task=task
            )
        self.view = new_task(task_id, delivery)

    def move(self, event: Event, at: float | None = None, **detail: Any) -> Transition:
        transition = step(self.view, event, time.time() if at is None else at, **detail)
        self.view = transition.view
        for observer in self.observers:
            observer.observe(transition)
        return transition

    def start(self, t: float) -> None:
        """received -> leased -> admitted -> the open-ports phase."""
        self.move(Event.RECEIVED, t)
        self.move(Event.LEASED, t)
        self.move(Event.ADMITTED, t + 0.1)
        self.move(Event.PHASE_STARTED, t + 0.2, phase=Phase.PORTS)

    def scan(self, *, open_ports: int, note: str = "delivered", start: float | None = None) -> None:
        """Both phases, then stored: completed."""
        t = time.time() if start is None else start
        self.start(t)
        self.move(Event.PHASE_STARTED, t + 1.2, phase=Phase.SERVICES)
        self.move(Event.SCANNED, t + 3.2, open_ports=open_ports)
        self.move(Event.STORED, t + 3.3, note=note)

    def refuse(self, reason: str) -> None:
        t = time.time()
        self.move(Event.RECEIVED, t)
        self.move(Event.REFUSED, t, error=reason)

    def cancel_running(self) -> None:
        t = time.time()
        self.start(t)
        self.move(Event.REVOKED, t + 0.4)
        self.move(Event.CANCELLED, t + 0.5, error="cancelled")
