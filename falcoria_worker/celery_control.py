"""Celery remote control (`celery inspect` / `celery control`, Flower, Tasker) in Celery's reply shapes.

Every command of celery/worker/control.py is answered: the ones that apply with what a stock worker
replies (request dicts, stats, queue declarations), the rest (pool, rate and time limits, elections,
memory probes, stamped headers) with Celery's `{'error': reason}`, so no client ever sees a KeyError.

The handlers read a `Snapshot` the loop builds on demand and act through `WorkerActions`; both are
called on the loop thread, which owns the pidbox. `handlers()` is what `broker.listen_control` takes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from celery.app.utils import bugreport
from celery.utils.functional import maybe_list
from celery.worker.control import nok, ok
from kombu import Queue

from falcoria_worker.config import KNOWN_KEYS, Settings, shown_value
from falcoria_worker.model import valid_task_id

if TYPE_CHECKING:
    from celery import Celery

    from falcoria_worker.celery_events import CeleryEvents
    from falcoria_worker.lifecycle import TaskView

POOL_IMPLEMENTATION = "falcoria_worker:scan threads"
REVOKED_SHOWN = 10_000  # ids listed by `inspect revoked` at most (Celery keeps up to 50,000)

# Commands of celery/worker/control.py that do not apply to a scan worker, with the reason given.
UNSUPPORTED: Mapping[str, str] = {
    "pool_grow": "the scan pool has CONCURRENCY threads: change the setting and restart the instance",
    "pool_shrink": "the scan pool has CONCURRENCY threads: change the setting and restart the instance",
    "pool_restart": "scans run as nmap processes; there is no pool of workers to restart",
    "autoscale": "the scan pool has CONCURRENCY threads: change the setting and restart the instance",
    "rate_limit": "scans are taken one per free slot; there is no rate limit to set",
    "time_limit": "a scan's time limit is its task's timeout, set by Tasker",
    "election": "falcoria-worker takes part in no election",
    "objgraph": "memory introspection is not offered",
    "memsample": "memory introspection is not offered",
    "memdump": "memory introspection is not offered",
    "revoke_by_stamped_headers": "scan tasks carry no stamps: revoke them by id",
}


class WorkerActions(Protocol):
    """What the control commands ask of the loop."""

    def revoke(self, task_ids: Sequence[str], *, terminate: bool) -> list[str]:
        """Flags the ids as revoked and stops the ones running; returns those that were running."""
        ...

    def shutdown(self) -> None:
        """A graceful stop: running scans are stopped and handed back to the queue."""
        ...

    def drain(self) -> None:
        """Stop taking scans; running ones finish."""
        ...

    def resume(self) -> None: ...


@dataclass(frozen=True)
class Snapshot:
    """What the replies are made of, as the loop sees it when a command arrives."""

    hostname: str  # the Celery node name, NODE_NAME@HOSTNAME
    pid: int
    started_at: float  # time.time() when the instance started
    settings: Settings
    tasks: tuple[TaskView, ...]  # every task this instance holds and has not ended
    totals: Mapping[str, int]  # tasks received per task name since start
    revoked: tuple[str, ...]  # oldest first
    queues: tuple[Queue, ...]  # what the instance consumes now (the scan queue only while not draining)
    broker: Mapping[str, Any]  # kombu's Connection.info(): no password in it
    task_names: tuple[str, ...]  # the scan task's first
    prefetch_count: int = 1
    draining: bool = False
    scans_left: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


def payload(view: TaskView) -> dict[str, Any]:
    """The task's argument in Tasker's shape (contract §2.1), from the parsed task."""
    task = view.task
    if task is None:
        raw = getattr(view.delivery, "payload", None)
        return raw if isinstance(raw, dict) else {}
    return {
        "ip": task.ip,
        "hostnames": list(task.hostnames),
        "project": task.project,
        "open_ports_opts": task.open_ports_opts,
        "service_opts": task.service_opts,
        "timeout": task.timeout,
        "include_services": task.include_services,
        "mode": task.mode.value,
        "user": {"id": task.user.id, "username": task.user.username},
        "open_ports_str": task.open_ports_str,
        "track_history": task.track_history,
    }


def request_info(view: TaskView, snap: Snapshot, *, safe: bool = False) -> dict[str, Any]:
    """A task as Celery's Request.info() shows it, plus the scan's phase and progress."""
    args: Any = [payload(view)]
    s = snap.settings
    return {
        "id": view.task_id,
        "name": snap.task_names[0],
        "args": repr(args) if safe else args,
        "kwargs": "{}" if safe else {},
        "type": snap.task_names[0],
        "hostname": snap.hostname,
        "time_start": view.started_at,
        "acknowledged": view.started_at is not None,
        "delivery_info": {
            "exchange": s.exchange_name,
            "routing_key": s.nmap_scan_routing_key,
            "priority": (getattr(view.delivery, "properties", None) or {}).get("priority", 0),
            "redelivered": view.attempt > 1,
        },
        "worker_pid": snap.pid,
        "phase": view.phase.value if view.phase is not None else "received",
        "percent": view.percent,
    }


def rusage() -> dict[str, float]:
    """Celery's stats.rusage: getrusage(RUSAGE_SELF) without the ru_ prefix."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {name[3:]: getattr(usage, name) for name in dir(usage) if name.startswith("ru_")}


def stats(snap: Snapshot, clock: int) -> dict[str, Any]:
    return {
        "total": dict(snap.totals),
        "pid": snap.pid,
        "clock": str(clock),
        "uptime": int(time.time() - snap.started_at),
        "pool": {
            "implementation": POOL_IMPLEMENTATION,
            "max-concurrency": snap.settings.concurrency,
            "threads": len(snap.tasks),
            "processes": [snap.pid],
        },
        "broker": dict(snap.broker),
        "prefetch_count": snap.prefetch_count,
        "rusage": rusage(),
        "draining": snap.draining,
        "scans_left": snap.scans_left,
        **snap.extra,
    }


def conf(snap: Snapshot) -> dict[str, str]:
    """The effective settings, secrets masked (as `falcoria-worker config` prints them)."""
    return {key: shown_value(snap.settings, key) for key in KNOWN_KEYS}


def report(snap: Snapshot, app: Celery) -> str:
    """Celery's bug report (software, platform) followed by the settings, secrets masked."""
    settings = "\n".join(f"{key}: {value}" for key, value in conf(snap).items())
    return f"{bugreport(app)}\nfalcoria-worker settings:\n{settings}\n"


class ControlPanel:
    """Handlers for kombu's pidbox Node: `handler(state, **arguments) -> reply`."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        actions: WorkerActions,
        events: CeleryEvents,
    ) -> None:
        self.snapshot = snapshot
        self.actions = actions
        self.events = events

    @property
    def clock(self) -> Any:
        return self.events.app.clock

    def handlers(self) -> dict[str, Callable[..., Any]]:
        table: dict[str, Callable[..., Any]] = {
            "ping": lambda _state, **_: ok("pong"),
            "clock": lambda _state, **_: {"clock": self.clock.value},
            "stats": lambda _state, **_: stats(self.snapshot(), self.clock.value),
            "active": self.active,
            "reserved": self.reserved,
            "scheduled": lambda _state, **_: [],
            "registered": lambda _state, **_: sorted(self.snapshot().task_names),
            "revoked": lambda _state, **_: list(self.snapshot().revoked[-REVOKED_SHOWN:]),
            "active_queues": self.active_queues,
            "conf": lambda _state, **_: conf(self.snapshot()),
            "report": lambda _state, **_: ok(report(self.snapshot(), self.events.app)),
            "query_task": self.query_task,
            "hello": self.hello,
            "revoke": self.revoke,
            "terminate": self.terminate,
            "shutdown": self.shutdown,
            "enable_events": lambda _state, **_: ok(self.events.enable_task_events()),
            "disable_events": lambda _state, **_: ok(self.events.disable_task_events()),
            "heartbeat": self.heartbeat,
            "cancel_consumer": self.cancel_consumer,
            "add_consumer": self.add_consumer,
        }
        # Celery's aliases of the inspect commands.
        for alias, name in (
            ("dump_active", "active"),
            ("dump_reserved", "reserved"),
            ("dump_schedule", "scheduled"),
            ("dump_revoked", "revoked"),
            ("dump_tasks", "registered"),
            ("dump_conf", "conf"),
        ):
            table[alias] = table[name]
        for name, reason in UNSUPPORTED.items():
            table[name] = _refusal(reason)
        return table

    # ------------------------------------------------------------------ inspect

    def active(self, _state: object, safe: bool = False, **_: Any) -> list[dict[str, Any]]:
        snap = self.snapshot()
        return [request_info(v, snap, safe=bool(safe)) for v in snap.tasks if v.started_at is not None]

    def reserved(self, _state: object, **_: Any) -> list[dict[str, Any]]:
        # Taken off the queue, not yet admitted: the lease and the checks are still running.
        snap = self.snapshot()
        return [request_info(v, snap) for v in snap.tasks if v.started_at is None]

    def active_queues(self, _state: object, **_: Any) -> list[dict[str, Any]]:
        return [dict(queue.as_dict(recurse=True)) for queue in self.snapshot().queues]

    def query_task(self, _state: object, ids: object = None, **_: Any) -> dict[str, Any]:
        wanted = set(maybe_list(ids) or [])
        snap = self.snapshot()
        return {
            v.task_id: ("active" if v.started_at is not None else "reserved", request_info(v, snap))
            for v in snap.tasks
            if v.task_id in wanted
        }

    def hello(
        self, _state: object, from_node: str | None = None, revoked: object = None, **_: Any
    ) -> dict[str, Any] | None:
        """A starting stock worker asks the others for their revoked ids (mingle)."""
        snap = self.snapshot()
        if from_node == snap.hostname:
            return None
        return {"revoked": list(snap.revoked[-REVOKED_SHOWN:]), "clock": self.clock.forward()}

    # ------------------------------------------------------------------ control

    def revoke(
        self, _state: object, task_id: object = None, terminate: bool = False, signal: object = None, **_: Any
    ) -> dict[str, str]:
        ids = [t for t in maybe_list(task_id) or [] if valid_task_id(t)]
        running = self.actions.revoke(ids, terminate=bool(terminate))
        if terminate:
            return ok(f"terminate: {', '.join(running)}" if running else "terminate: tasks unknown")
        return ok(f"tasks {', '.join(ids)} flagged as revoked")

    def terminate(self, _state: object, signal: object = None, task_id: object = None, **_: Any) -> dict:
        return self.revoke(_state, task_id=task_id, terminate=True, signal=signal)

    def shutdown(self, _state: object, msg: str = "Got shutdown from remote", **_: Any) -> dict[str, str]:
        self.actions.shutdown()
        return ok("shutting down: running scans are stopped and handed back to the queue")

    def heartbeat(self, _state: object, **_: Any) -> None:
        self.events.heartbeat()

    def cancel_consumer(self, _state: object, queue: str | None = None, **_: Any) -> dict[str, str]:
        scan_queue = self.snapshot().settings.nmap_scan_queue_name
        if queue != scan_queue:
            return nok(f"not consuming from {queue}: this worker's task queue is {scan_queue}")
        self.actions.drain()
        return ok(f"no longer consuming from {queue}")

    def add_consumer(self, _state: object, queue: str | None = None, **_: Any) -> dict[str, str]:
        scan_queue = self.snapshot().settings.nmap_scan_queue_name
        if queue != scan_queue:
            return nok(f"cannot consume from {queue}: this worker's task queue is {scan_queue}")
        self.actions.resume()
        return ok(f"add consumer {queue}")


def _refusal(reason: str) -> Callable[..., dict[str, str]]:
    def refuse(_state: object, **_: Any) -> dict[str, str]:
        return nok(f"not supported by falcoria-worker: {reason}")

    return refuse
