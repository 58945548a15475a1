"""What becomes of one scan message: refused, dropped as a duplicate, revoked, or leased and admitted.
Runs on the loop thread, in the consumer's callback, before the message is acked."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from falcoria_worker.config import Settings
from falcoria_worker.errors import Rejected, ScanFailed
from falcoria_worker.identity import Identity
from falcoria_worker.lifecycle import Do, Event, Outcome, Transition, new_task
from falcoria_worker.logs import task_context
from falcoria_worker.model import ScanTask
from falcoria_worker.observers import ObserverHub
from falcoria_worker.pipeline import Engine, Plan
from falcoria_worker.protocol import SCAN_TASK, Delivery
from falcoria_worker.redis_store import RedisStore
from falcoria_worker.spool import Spool
from falcoria_worker.tasks import TaskRecord

log = logging.getLogger(__name__)

TERMINAL = frozenset({Outcome.COMPLETED.value, Outcome.FAILED.value, Outcome.CANCELLED.value})


class Admission:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        store: RedisStore,
        hub: ObserverHub,
        spool: Spool | None,
        identity: Identity,
        revoked_here: Callable[[str], bool],
        admitted: Callable[[TaskRecord, Plan], None],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.hub = hub
        self.spool = spool
        self.identity = identity
        self.revoked_here = revoked_here
        self.admitted = admitted  # registers the record and starts its scan thread

    def admit(self, message: Any) -> Transition:
        """Decide what to do with one scan message; the returned transition says whether to ack it.
        Raises RedisError when Redis cannot tell (the caller returns the message to the queue)."""
        delivery = Delivery.from_kombu(message)
        record = TaskRecord(new_task(delivery.task_id, delivery), self.hub)
        if delivery.task is None:
            return self._not_a_task(record, delivery)
        task = delivery.task
        with task_context(task_id=delivery.task_id, project_id=task.project, target=task.ip):
            record.apply(Event.RECEIVED)
            return self._decide(record, delivery, task)

    def _not_a_task(self, record: TaskRecord, delivery: Delivery) -> Transition:
        with task_context(task_id=delivery.task_id or None):
            if not delivery.name:
                log.error("rejected an undecodable message: %s", delivery.refusal)
                return record.apply(Event.REFUSED, error=delivery.refusal)
            if delivery.name != SCAN_TASK:
                log.error("task %s on the scan queue is not %s; dropped", delivery.name[:100], SCAN_TASK)
                return record.apply(Event.IGNORED)
            log.error("rejected task: %s", delivery.refusal)
            record.apply(Event.RECEIVED)
            return record.apply(Event.REFUSED, error=delivery.refusal)

    def _decide(self, record: TaskRecord, delivery: Delivery, task: ScanTask) -> Transition:
        task_id = record.task_id
        skip = self._skip_reason(task_id)
        if skip == "revoked":
            log.warning("not scanning: revoked before it started")
            return record.apply(Event.REVOKED)
        if skip is not None:
            log.warning("not scanning: %s", skip)
            return record.apply(Event.DUPLICATE, error=skip)
        s = self.settings
        verdict = self.store.claim(
            task_id, self.identity.owner, s.lease_ttl, delivery.dumps(), s.max_attempts
        )
        if verdict == "busy":
            log.warning("duplicate delivery of a task another worker is running; dropped")
            return record.apply(Event.DUPLICATE, error="another worker runs it")
        if verdict == "poison":
            reason = f"gave up after {s.max_attempts} attempts: the worker died each time"
            log.error("%s", reason)
            return record.apply(Event.POISON, error=reason)
        record.apply(Event.LEASED)
        try:
            plan = self.engine.prepare(task)
        except (Rejected, ScanFailed) as exc:
            reason = exc.reason if isinstance(exc, Rejected) else str(exc)
            log.error("rejected task: %s", reason)
            return record.apply(Event.REFUSED, error=reason)
        transition = record.apply(Event.ADMITTED)
        log.info("received scan of %s (mode %s, timeout %d s)", task.ip, task.mode.value, task.timeout)
        if transition.has(Do.START_SCAN):
            self.admitted(record, plan)
        return transition

    def _skip_reason(self, task_id: str) -> str | None:
        finished = self.store.get_status(task_id).get("state")
        if finished in TERMINAL:
            # A redelivered copy of a task that already ended (e.g. re-queued by a crash between the
            # requeue's publish and the lease release): nothing of it is left to touch.
            return f"duplicate delivery of a task that already ended ({finished})"
        if self.store.was_delivered(task_id) or (self.spool is not None and self.spool.has(task_id)):
            return "duplicate delivery of a task whose result is already delivered or spooled"
        if self.revoked_here(task_id) or self.store.is_revoked(task_id):
            return "revoked"
        return None
