"""Whatever reports on tasks and on the instance, fed from one hub: each transition is published once,
and an observer that fails is logged and skipped, never in the way of the others or of the loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from falcoria_worker.lifecycle import (
    Event,
    Observer,
    TaskView,
    Ticking,
    Transition,
    WorkerObserver,
    step,
    stored_task,
)
from falcoria_worker.logs import set_phase
from falcoria_worker.model import Phase
from falcoria_worker.spool import SpoolEntry
from falcoria_worker.systemd_notify import Notifier

log = logging.getLogger(__name__)


class ObserverHub:
    """Observers are registered at start, before any thread publishes; after that the lists are only read."""

    def __init__(self) -> None:
        self.observers: list[Observer] = []
        self.worker_observers: list[WorkerObserver] = []
        self.ticking: list[Ticking] = []

    def add(self, observer: Observer) -> None:
        self.observers.append(observer)

    def add_worker(self, observer: WorkerObserver) -> None:
        self.worker_observers.append(observer)

    def add_ticking(self, observer: Ticking) -> None:
        self.ticking.append(observer)

    def tick(self, now: float) -> None:
        """Every turn of the loop, on its thread: what an observer does on its own clock (heartbeats,
        the metrics file)."""
        for observer in self.ticking:
            try:
                observer.tick(now)
            except Exception:
                log.exception("observer %s failed on its tick", type(observer).__name__)

    def next_due(self) -> float | None:
        """The earliest turn an observer asked for (monotonic): the loop sleeps no longer."""
        due = [d for d in (observer.next_due() for observer in self.ticking) if d is not None]
        return min(due, default=None)

    def publish(self, transition: Transition) -> None:
        for observer in self.observers:
            try:
                observer.observe(transition)
            except Exception:
                log.exception("observer %s failed on %s", type(observer).__name__, transition.event.value)

    def worker_event(self, name: str, *args: object) -> None:
        """Calls `name` (a WorkerObserver method) on every worker observer."""
        for observer in self.worker_observers:
            try:
                getattr(observer, name)(*args)
            except Exception:
                log.exception("worker observer %s failed on %s", type(observer).__name__, name)


class JournalFields:
    """The PHASE= journal field of the task's later records. Runs on the thread that applied the
    transition, whose log context is the task's."""

    def observe(self, transition: Transition) -> None:
        if transition.event is Event.PHASE_STARTED and transition.view.phase is not None:
            set_phase(transition.view.phase.value)


class HasProblem(Protocol):
    """A part whose trouble STATUS reports while it lasts."""

    problem: str | None


class StatusLine:
    """systemd's STATUS line and the instance's READY/STOPPING. Holds the views of the running tasks:
    written by every thread that applies a transition, read by the loop; a lock guards the dict."""

    def __init__(self, notifier: Notifier, *sources: HasProblem | None) -> None:
        self.notifier = notifier
        # Their `problem` is what STATUS keeps saying until it no longer holds (a refused reload, a spool
        # backing off); a missing part (no deliverer without ScanLedger) says nothing.
        self.sources = [source for source in sources if source is not None]
        self._views: dict[str, TaskView] = {}
        self._lock = threading.Lock()
        self.draining = False
        self._fenced: set[str] = set()  # stopped since Redis went away: STATUS says so until it is back

    def observe(self, transition: Transition) -> None:
        view = transition.view
        with self._lock:
            if transition.event is Event.FENCED and view.fence:
                self._fenced.add(view.task_id)
            if view.running:
                self._views[view.task_id] = view
            else:
                self._views.pop(view.task_id, None)

    def worker_started(self) -> None:
        self.notifier.status("starting")

    def worker_ready(self) -> None:
        self.notifier.ready()

    def consuming_changed(self, consuming: bool) -> None:
        pass

    def draining_changed(self, draining: bool) -> None:
        self.draining = draining

    def worker_stopping(self) -> None:
        self.notifier.stopping()
        self.notifier.status("stopping")

    def text(self, *, broker_down: str | None, redis_ok: bool, scans: int) -> str:
        line = self._text(broker_down=broker_down, redis_ok=redis_ok, scans=scans)
        problems = [source.problem for source in self.sources]  # each read once: another thread sets it
        return "; ".join([line, *(problem for problem in problems if problem)])

    def _text(self, *, broker_down: str | None, redis_ok: bool, scans: int) -> str:
        busy = f"; {scans} scan(s) continue" if scans else ""
        with self._lock:
            if redis_ok:
                self._fenced.clear()
            if self._fenced:
                busy += f"; {len(self._fenced)} scan(s) fenced: lease not renewed"
        if broker_down is not None:
            return f"reconnecting to RabbitMQ: {broker_down}{busy}"
        if not redis_ok:
            return f"waiting for Redis; not taking new scans{busy}"
        with self._lock:
            views = list(self._views.values())
        draining = f"draining: {scans} scan{'' if scans == 1 else 's'} left" if self.draining else ""
        if not views:
            return draining or "idle"
        parts = []
        for v in views:
            pct = f" {v.percent:.0f}%" if v.percent is not None else ""
            ip = v.task.ip if v.task else v.task_id
            if v.phase is Phase.PORTS:
                parts.append(f"scanning {ip}: open ports{pct}")
            elif v.phase is Phase.SERVICES:
                parts.append(f"{v.detail}{pct}")
            else:
                parts.append(f"{ip}: {v.detail}")
        return "; ".join([draining, *parts] if draining else parts)


def delivery_reporter(
    hub: ObserverHub, clock: Callable[[], float]
) -> Callable[[SpoolEntry, str | None], None]:
    """The deliverer's callback: an upload's outcome is one more transition of the stored task."""

    def report(entry: SpoolEntry, error: str | None) -> None:
        event = Event.DELIVERED if error is None else Event.DELIVERY_REFUSED
        hub.publish(step(stored_task(entry.task_id), event, clock(), error=error))

    return report
