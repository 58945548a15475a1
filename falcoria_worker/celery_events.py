"""Celery events for Flower and `celery events`: an observer of the task lifecycle and of the instance.

Sent through Celery's own `EventDispatcher` on a connection of its own (kombu channels are not
thread-safe, and transitions arrive from scan threads), with the fields a stock worker puts in them
(celery/worker/strategy.py, request.py, heartbeat.py). As in a stock worker, worker events (online,
heartbeat every 2 s, offline) are always sent and task events only when enabled: by
WORKER_SEND_TASK_EVENTS (`celery worker -E`) or at run time by the `enable_events`/`disable_events`
control commands, which Flower resends every few seconds.

Events are ephemeral: while the broker is away they are dropped, not buffered (a stock worker's
buffer has no bound), and a send one heartbeat interval later reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.events import EventDispatcher
from celery.utils.sysinfo import load_average
from celery.worker.state import SOFTWARE_INFO
from kombu import Connection

if TYPE_CHECKING:
    from falcoria_worker.lifecycle import TaskView, Transition

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0  # Celery's default; Flower marks a worker offline after missing a few
TASK_GROUP = "task"
# Stages and outcomes compared by value: they are StrEnums of the lifecycle.
_ENDED = "ended"
_SUCCEEDED, _FAILED, _CANCELLED, _REQUEUED = "completed", "failed", "cancelled", "queued"
_NOT_OURS = frozenset({"taken_over", "dropped"})


def scan_result(view: TaskView) -> str:
    """The one-line result of a finished scan, e.g. "3 open ports; delivered"."""
    ports = view.open_ports or 0
    parts = [f"{ports} open port{'' if ports == 1 else 's'}"]
    note = getattr(view, "note", None)
    if note:
        parts.append(str(note))
    if view.error:
        parts.append(view.error)
    return "; ".join(parts)


def _celery_headers(view: TaskView) -> dict[str, Any]:
    delivery = view.delivery
    headers = getattr(delivery, "headers", None)
    return headers if isinstance(headers, dict) else {}


def received_fields(view: TaskView, task_name: str) -> dict[str, Any]:
    """task-received as celery/worker/strategy.py sends it; args is the payload's repr as Tasker's
    Celery recorded it (argsrepr), which holds nothing secret."""
    headers = _celery_headers(view)
    args = headers.get("argsrepr")
    if not isinstance(args, str):
        payload = getattr(view.delivery, "payload", None)
        args = repr((payload,)) if payload is not None else "()"
    return {
        "name": task_name,
        "args": args,
        "kwargs": headers.get("kwargsrepr") if isinstance(headers.get("kwargsrepr"), str) else "{}",
        "root_id": headers.get("root_id"),
        "parent_id": headers.get("parent_id"),
        "retries": max(view.attempt - 1, 0),
        "eta": headers.get("eta"),
        "expires": headers.get("expires"),
    }


def end_event(view: TaskView, at: float) -> tuple[str, dict[str, Any]] | None:
    """The Celery event that reports how a task ended, or None when the end is not this worker's to
    report (another instance took it over; a duplicate or foreign message)."""
    outcome = str(view.outcome) if view.outcome is not None else None
    if outcome in _NOT_OURS or outcome is None:
        return None
    if outcome == _SUCCEEDED:
        runtime = max(at - view.started_at, 0.0) if view.started_at is not None else 0.0
        return "task-succeeded", {"result": scan_result(view), "runtime": runtime}
    if outcome == _CANCELLED:
        started = view.started_at is not None
        # terminated/signum as a stock worker reports a revoke with terminate: nmap got SIGTERM.
        fields = {"terminated": started, "signum": 15 if started else None, "expired": False}
        return "task-revoked", fields
    if outcome == _REQUEUED:
        return "task-retried", {"exception": view.error or "re-queued", "traceback": ""}
    return "task-failed", {"exception": view.error or outcome, "traceback": ""}


def _announced(transition: Transition) -> bool:
    """A message this instance received as a scan task: it left NEW for a later stage, or it was refused
    at once (a refusal is a received task that failed, for Flower as for a stock worker)."""
    if transition.after == "new":
        return False
    outcome = transition.view.outcome
    return transition.after != _ENDED or str(outcome) == _FAILED


class CeleryEvents:
    """Observer of transitions and of the instance (`lifecycle.Observer` and `WorkerObserver`).

    The loop calls `tick()` every turn (heartbeats, reconnecting) and hands the pidbox's
    `enable_events`/`disable_events`/`heartbeat` to the methods of the same names."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        hostname: str,
        *,
        task_events: bool,
        task_name: str = "project.nmap.scan",
        app: Celery | None = None,
    ) -> None:
        self._connect = connect
        self.hostname = hostname
        self.task_name = task_name
        # A private app: its clock is the Lamport clock of the events (and of the pidbox's replies).
        self.app = app or Celery("falcoria-worker", set_as_current=False)
        self._groups: set[str] = set() if task_events else {"worker"}
        self._lock = threading.Lock()
        self._dispatcher: EventDispatcher | None = None
        self._retry_at = 0.0
        self._online = False
        self._last_heartbeat = 0.0
        self._active: set[str] = set()
        self._processed = 0
        self._started: set[str] = set()

    # ------------------------------------------------------------------ the instance

    @property
    def task_events(self) -> bool:
        return not self._groups or TASK_GROUP in self._groups

    def worker_started(self) -> None:
        """Nothing yet: Flower lists a worker from its first event, which is sent once it is ready."""

    def worker_ready(self) -> None:
        self._online = True
        self._send_worker("worker-online")
        self._last_heartbeat = time.monotonic()

    def consuming_changed(self, consuming: bool) -> None:
        """Consumption is the pidbox's and the metrics' to report; events carry no such field."""

    def draining_changed(self, draining: bool) -> None:
        """Likewise: a stock worker's events carry no drain either."""

    def worker_stopping(self) -> None:
        if self._online:
            self._online = False
            self._send_worker("worker-offline")
        self.close()

    def tick(self, now: float | None = None) -> None:
        """A heartbeat every HEARTBEAT_INTERVAL seconds while online; cheap otherwise."""
        now = time.monotonic() if now is None else now
        due = self.next_due()
        if due is not None and now >= due:
            self._last_heartbeat = now
            self._send_worker("worker-heartbeat")

    def next_due(self) -> float | None:
        """The next heartbeat's time (monotonic) while online."""
        return self._last_heartbeat + HEARTBEAT_INTERVAL if self._online else None

    def heartbeat(self) -> None:
        """The `heartbeat` control command: one now, with the frequency a stock worker reports."""
        self._send("worker-heartbeat", freq=5, **SOFTWARE_INFO)

    def enable_task_events(self) -> str:
        with self._lock:
            if self._groups and TASK_GROUP not in self._groups:
                self._groups.add(TASK_GROUP)
                log.info("task events enabled by remote control")
                return "task events enabled"
        return "task events already enabled"

    def disable_task_events(self) -> str:
        with self._lock:
            if TASK_GROUP in self._groups or not self._groups:
                self._groups = {"worker"}
                log.info("task events disabled by remote control")
                return "task events disabled"
        return "task events already disabled"

    def close(self) -> None:
        # A stop may come while the broker blocks publishers (a resource alarm): it then never answers
        # connection.close, so the events connection is dropped without the handshake.
        with self._lock:
            self._drop(handshake=False)

    # ------------------------------------------------------------------ tasks

    def observe(self, transition: Transition) -> None:
        view = transition.view
        task_id = transition.task_id
        ended = transition.after == _ENDED and transition.before != _ENDED
        if task_id and transition.before == "new" and _announced(transition):
            self._active.add(task_id)
            self._send_task("task-received", task_id, **received_fields(view, self.task_name))
        if task_id not in self._active:
            return  # not a scan message, or a task this instance did not receive (recovery)
        if view.started_at is not None and task_id not in self._started:
            self._started.add(task_id)
            self._send_task("task-started", task_id)
        if ended:
            self._active.discard(task_id)
            self._started.discard(task_id)
            self._processed += 1
            end = end_event(view, transition.at)
            if end is not None:
                self._send_task(end[0], task_id, **end[1])

    # ------------------------------------------------------------------ sending

    def _send_worker(self, kind: str) -> None:
        self._send(
            kind,
            freq=HEARTBEAT_INTERVAL,
            active=len(self._active),
            processed=self._processed,
            loadavg=load_average(),
            **SOFTWARE_INFO,
        )

    def _send_task(self, kind: str, task_id: str, **fields: Any) -> None:
        if self.task_events:
            self._send(kind, uuid=task_id, **fields)

    def _send(self, kind: str, **fields: Any) -> None:
        with self._lock:
            if self._dispatcher is None and time.monotonic() < self._retry_at:
                return  # the broker was away a moment ago: no scan thread waits on a connect for an event
            try:
                if self._dispatcher is None:
                    self._dispatcher = self._open()
                self._dispatcher.groups = set(self._groups)
                self._dispatcher.send(kind, **fields)
            except Exception as exc:
                # The broker is away: this event is lost; one heartbeat interval later a send reconnects.
                # No close handshake on a connection that just failed: a silent broker never answers it,
                # and the loop (which sends the heartbeats) would wait for it, its leases unrenewed.
                log.debug("could not send %s: %s", kind, exc)
                self._retry_at = time.monotonic() + HEARTBEAT_INTERVAL
                self._drop(handshake=False)

    def _open(self) -> EventDispatcher:
        return EventDispatcher(
            self._connect(),
            hostname=self.hostname,
            enabled=True,
            groups=set(self._groups),
            buffer_while_offline=False,
            app=self.app,
        )

    def _drop(self, *, handshake: bool = True) -> None:
        dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            try:
                dispatcher.close()
                if handshake:
                    dispatcher.connection.release()
                else:
                    dispatcher.connection.collect()
            except Exception as exc:
                log.debug("closing the events connection: %s", exc)
