"""What other parties tell every instance: the cancel and IP-refresh broadcasts, and Celery's pidbox
(ping, revoke, active). All of it runs on the loop thread, which owns the revoked-id memory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any

import redis

from falcoria_worker import protocol
from falcoria_worker.config import Settings
from falcoria_worker.errors import Rejected
from falcoria_worker.identity import Identity
from falcoria_worker.lifecycle import Event
from falcoria_worker.logs import task_context
from falcoria_worker.model import parse_cancel, valid_task_id
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
    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        identity: Identity,
        running: dict[str, TaskRecord],
        *,
        janitor: Executor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self.running = running  # the loop's: read here on the loop thread only
        self.janitor = janitor
        self.revoked: dict[str, float] = {}

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {"ping": self._ping, "revoke": self._revoke, "active": self._active}

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

    def _ping(self, _state: object, **_kwargs: Any) -> dict[str, str]:
        return {"ok": "pong"}

    def _revoke(self, _state: object, task_id: str | list[str] | None = None, **_kwargs: Any) -> dict:
        ids = [task_id] if isinstance(task_id, str) else [t for t in (task_id or []) if isinstance(t, str)]
        ids = [t for t in ids if valid_task_id(t)]
        self.cancel_tasks(ids, source="revoke", now=time.monotonic())
        return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}

    def _active(self, _state: object, **_kwargs: Any) -> list[dict[str, Any]]:
        views = [r.view for r in self.running.values()]
        return [
            {
                "id": v.task_id,
                "name": SCAN_TASK,
                "hostname": self.identity.nodename,
                "target": v.task.ip if v.task else None,
                "phase": v.phase.value if v.phase else "received",
                "percent": v.percent,
            }
            for v in views
        ]
