"""What other parties tell every instance: the cancel and IP-refresh broadcasts, and Celery's remote
control (celery_control.ControlPanel's commands, carried out here). All of it runs on the loop thread,
which owns the revoked-id memory, the task records and the drain flag."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any

import redis

from falcoria_worker import broker, protocol
from falcoria_worker.celery_control import ControlPanel, Snapshot
from falcoria_worker.celery_events import CeleryEvents
from falcoria_worker.config import Settings
from falcoria_worker.connection import BrokerLink
from falcoria_worker.errors import Rejected
from falcoria_worker.identity import Identity
from falcoria_worker.lifecycle import Event, Stage, Transition
from falcoria_worker.logs import task_context
from falcoria_worker.model import parse_cancel
from falcoria_worker.observers import ObserverHub
from falcoria_worker.protocol import SCAN_TASK
from falcoria_worker.redis_store import RedisStore
from falcoria_worker.scanning import logged
from falcoria_worker.tasks import TaskRecord
from falcoria_worker.worker_ip import current_ip

log = logging.getLogger(__name__)

CANCEL_TASK = "project.nmap.cancel"
UPDATE_IP_TASK = "worker.update_ip"
REVOKED_MEMORY = 10_000  # revoked ids kept in memory (Celery keeps 50,000; Redis holds them too)


class Control:
    """Also the `WorkerActions` of the control panel, and an observer counting the tasks received (the
    `total` of `inspect stats`)."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        identity: Identity,
        running: dict[str, TaskRecord],
        *,
        janitor: Executor,
        hub: ObserverHub,
        link: BrokerLink,
        events: CeleryEvents,
        update_consumption: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self.running = running  # the loop's: read here on the loop thread only
        self.janitor = janitor
        self.hub = hub
        self.link = link
        self.update_consumption = update_consumption
        self.revoked: dict[str, float] = {}
        self.draining = False
        self.received = 0
        self.started_at = time.time()
        self.panel = ControlPanel(self.snapshot, self, events)

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return self.panel.handlers()

    def observe(self, transition: Transition) -> None:
        if transition.event is Event.RECEIVED and transition.before is Stage.NEW:
            self.received += 1  # on the loop thread, where admission runs

    def on_broadcast(self, message: Any) -> None:
        try:
            decoded = protocol.decode_task_message(
                message.headers or {}, message.body, message.content_type, message.content_encoding
            )
        except Rejected as exc:
            log.error("rejected an undecodable broadcast: %s", exc.reason)
            return
        if decoded.name == CANCEL_TASK:
            try:
                ids = parse_cancel(decoded.args[0] if len(decoded.args) == 1 else None)
            except Rejected as exc:
                log.error("rejected a cancel broadcast: %s", exc.reason)
                return
            self.cancel_tasks(ids, source="cancel broadcast", now=time.monotonic())
        elif decoded.name == UPDATE_IP_TASK:
            self.janitor.submit(logged(self.register_ip))  # an echo URL may take seconds: not on the loop
        else:
            log.warning("ignored broadcast task %s", decoded.name[:100])

    def cancel_tasks(self, ids: Iterable[str], *, source: str, now: float) -> None:
        ids = list(ids)
        for task_id in ids:
            self._remember(task_id, now)
            record = self.running.get(task_id)
            if record is not None:
                record.apply(Event.REVOKED)
                task = record.view.task
                with task_context(task_id=task_id, target=task.ip if task else None):
                    log.info("cancelled by %s", source)
        try:
            self.store.mark_revoked(ids)
        except redis.RedisError as exc:
            log.warning("could not record revoked ids in Redis: %s", exc)

    def register_ip(self) -> None:
        ip = current_ip(self.settings)
        if ip is None:
            log.warning("no IP to register: set WORKER_IP (no default route found)")
            return
        try:
            self.store.register_ip(ip)
            log.info("registered worker IP %s", ip)
        except redis.RedisError as exc:
            log.warning("could not register the worker IP: %s", exc)

    def is_revoked_here(self, task_id: str) -> bool:
        return task_id in self.revoked

    def _remember(self, task_id: str, now: float) -> None:
        self.revoked[task_id] = now
        if len(self.revoked) > REVOKED_MEMORY:
            for old in sorted(self.revoked, key=self.revoked.__getitem__)[: REVOKED_MEMORY // 10]:
                del self.revoked[old]

    # ------------------------------------------------------------------ remote control

    def snapshot(self) -> Snapshot:
        conn = self.link.conn
        scan = [] if self.draining else [broker.scan_queue(self.settings)]
        return Snapshot(
            hostname=self.identity.nodename,
            pid=os.getpid(),
            started_at=self.started_at,
            settings=self.settings,
            tasks=tuple(record.view for record in self.running.values()),
            totals={SCAN_TASK: self.received} if self.received else {},
            revoked=tuple(sorted(self.revoked, key=self.revoked.__getitem__)),
            queues=(*scan, *self.link.broadcasts),
            broker=_broker_info(conn.info()) if conn is not None else {},
            task_names=(SCAN_TASK, CANCEL_TASK, UPDATE_IP_TASK),
            draining=self.draining,
            scans_left=len(self.running),
        )

    def revoke(self, task_ids: Sequence[str], *, terminate: bool) -> list[str]:
        # Tasker stops a project with revoke(terminate=False) and expects its running scans to stop:
        # here a revoke always stops nmap, with or without terminate.
        running = [task_id for task_id in task_ids if task_id in self.running]
        self.cancel_tasks(task_ids, source="terminate" if terminate else "revoke", now=time.monotonic())
        return running

    def shutdown(self) -> None:
        # The loop's own graceful stop: running scans are stopped and handed back to the queue.
        log.info("shutdown by remote control")
        os.kill(os.getpid(), signal.SIGTERM)

    def drain(self) -> None:
        self._set_draining(True)

    def resume(self) -> None:
        self._set_draining(False)

    def _set_draining(self, draining: bool) -> None:
        if draining != self.draining:
            self.draining = draining
            log.info("draining: taking no new scans" if draining else "resumed: taking new scans")
            self.hub.worker_event("draining_changed", draining)
        self.update_consumption()


def _broker_info(info: dict[str, Any]) -> dict[str, Any]:
    """kombu's connection info, as `inspect stats` sends it: the transport options carry our
    connection.blocked callbacks, which are nothing a JSON reply can hold."""
    options = info.get("transport_options") or {}
    return {**info, "transport_options": {k: v for k, v in options.items() if not callable(v)}}
