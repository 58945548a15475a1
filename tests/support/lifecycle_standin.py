"""A stand-in for falcoria_worker.lifecycle's published types (Stage, Outcome, TaskView, Transition),
with the same names, values and fields the observers read, for testing observers before the
lifecycle module is on this branch. Replace the imports with falcoria_worker.lifecycle once it is."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from falcoria_worker.model import Phase, ScanTask


class Stage(StrEnum):
    NEW = "new"
    INCOMING = "incoming"
    LEASED = "leased"
    RECEIVED = "received"
    PORTS_SCAN = "ports_scan"
    SERVICE_SCAN = "service_scan"
    SCANNED = "scanned"
    ENDED = "ended"


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "queued"
    TAKEN_OVER = "taken_over"
    DROPPED = "dropped"


_RUNNING = frozenset({Stage.RECEIVED, Stage.PORTS_SCAN, Stage.SERVICE_SCAN, Stage.SCANNED})


@dataclass(frozen=True)
class TaskView:
    task_id: str
    task: ScanTask | None = None
    delivery: Any = None
    stage: Stage = Stage.NEW
    phase: Phase | None = None
    percent: float | None = None
    error: str | None = None
    outcome: Outcome | None = None
    open_ports: int | None = None
    received_at: float | None = None
    started_at: float | None = None
    attempt: int = 0
    note: str | None = None

    @property
    def running(self) -> bool:
        return self.stage in _RUNNING


@dataclass(frozen=True)
class Transition:
    task_id: str
    event: str
    before: Stage
    after: Stage
    actions: tuple[Any, ...]
    view: TaskView
    at: float


class Life:
    """Walks one task through its stages, handing each transition to the observers."""

    def __init__(self, observers: list[Any], task_id: str, task: ScanTask | None, delivery: Any = None):
        self.observers = observers
        self.view = TaskView(task_id=task_id, task=task, delivery=delivery)

    def move(self, event: str, at: float | None = None, **changes: Any) -> Transition:
        at = time.time() if at is None else at
        before = self.view.stage
        self.view = replace(self.view, **changes)
        transition = Transition(self.view.task_id, event, before, self.view.stage, (), self.view, at)
        for observer in self.observers:
            observer.observe(transition)
        return transition

    def scan(self, *, open_ports: int, note: str = "delivered", start: float | None = None) -> None:
        """received -> admitted -> both phases -> completed."""
        t = time.time() if start is None else start
        self.move("received", t, stage=Stage.INCOMING, received_at=t)
        self.move("leased", t, stage=Stage.LEASED, attempt=1)
        self.move("admitted", t + 0.1, stage=Stage.RECEIVED, started_at=t + 0.1)
        self.move("phase_started", t + 0.2, stage=Stage.PORTS_SCAN, phase=Phase.PORTS)
        self.move("phase_started", t + 1.2, stage=Stage.SERVICE_SCAN, phase=Phase.SERVICES)
        self.move("scanned", t + 3.2, stage=Stage.SCANNED, open_ports=open_ports)
        self.move("stored", t + 3.3, stage=Stage.ENDED, outcome=Outcome.COMPLETED, note=note)

    def refuse(self, reason: str) -> None:
        t = time.time()
        self.move("received", t, stage=Stage.INCOMING, received_at=t)
        self.move("refused", t, stage=Stage.ENDED, outcome=Outcome.FAILED, error=f"rejected: {reason}")

    def cancel_running(self) -> None:
        t = time.time()
        self.move("received", t, stage=Stage.INCOMING, received_at=t)
        self.move("leased", t, stage=Stage.LEASED, attempt=1)
        self.move("admitted", t, stage=Stage.RECEIVED, started_at=t)
        self.move("phase_started", t, stage=Stage.PORTS_SCAN, phase=Phase.PORTS)
        self.move("cancelled", t + 0.5, stage=Stage.ENDED, outcome=Outcome.CANCELLED, error="cancelled")
