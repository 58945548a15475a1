"""A task this instance holds: its lifecycle view, its cancel signal and its nmap process."""

from __future__ import annotations

import threading
import time
from typing import Any

from falcoria_worker.lifecycle import Do, Event, TaskView, Transition, step
from falcoria_worker.observers import ObserverHub
from falcoria_worker.runner import NmapProcess


class TaskRecord:
    """Shared by the loop (cancel, revoke, lease lost, stop) and the task's scan thread (phases, the
    end): `apply` holds the record's lock, so every event sees the view the previous one left. Observers
    are told outside the lock: a slow Redis must not delay a cancel arriving on the loop."""

    def __init__(self, view: TaskView, hub: ObserverHub) -> None:
        self.view = view
        self.cancel = threading.Event()
        self._proc: NmapProcess | None = None
        self._lock = threading.Lock()
        self._hub = hub

    @property
    def task_id(self) -> str:
        return self.view.task_id

    def apply(self, event: Event, **detail: Any) -> Transition:
        with self._lock:
            transition = step(self.view, event, time.time(), **detail)
            self.view = transition.view
            if transition.has(Do.STOP_NMAP):
                self.cancel.set()
                if self._proc is not None:
                    self._proc.cancel()  # SIGTERM to the group right now, from the calling thread
        self._hub.publish(transition)
        return transition

    def attach(self, proc: NmapProcess | None) -> None:
        with self._lock:
            self._proc = proc
            if proc is not None and self.cancel.is_set():
                proc.cancel()  # a cancel that raced the start
