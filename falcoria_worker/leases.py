"""The leases of this instance's tasks, and getting tasks back on the queue: heartbeats, a sweep of
expired leases, recovery at start, and the requeue itself (lease first, then the publish)."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable
from typing import Any

import redis

from falcoria_worker import broker
from falcoria_worker.config import Settings
from falcoria_worker.connection import BrokerLink
from falcoria_worker.delivery import Confirm, Verdict
from falcoria_worker.errors import ConfigError, Retryable, describe
from falcoria_worker.identity import Identity
from falcoria_worker.lifecycle import Action, Do, Event, Transition, new_task, step
from falcoria_worker.logs import task_context
from falcoria_worker.observers import ObserverHub
from falcoria_worker.protocol import Delivery
from falcoria_worker.redis_store import LeaseOfReport, RedisStore
from falcoria_worker.tasks import TaskRecord

log = logging.getLogger(__name__)

REQUEUE_GRACE = 3600.0  # a requeued task nobody claimed by then is requeued again


_VERDICTS: dict[LeaseOfReport, Verdict] = {"released": "upload", "held": "wait", "lost": "drop"}


def report_owner(store: RedisStore, owner: str) -> Confirm:
    """The deliverer's check before an upload: a stored report goes out only while no other instance
    owns its task, and waits while our own release of the lease is on the way."""

    def confirm(task_id: str) -> Verdict:
        try:
            lease = store.lease_of_report(task_id, owner)
        except redis.RedisError as exc:
            raise Retryable(f"Redis unavailable: {describe(exc)}") from exc
        return _VERDICTS[lease]

    return confirm


class Requeues:
    """Carries out REQUEUE: takes the task back from its lease and publishes its delivery again.
    Scan threads ask (observe), the loop thread does it (it owns the broker channel)."""

    def __init__(self, settings: Settings, store: RedisStore, identity: Identity) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self._asked: queue.SimpleQueue[tuple[str, Action]] = queue.SimpleQueue()
        self._publish: list[tuple[str, Delivery]] = []  # the loop's only

    def observe(self, transition: Transition) -> None:
        for action in transition.actions:
            if action.do is Do.REQUEUE:
                self._asked.put((transition.task_id, action))

    @property
    def pending(self) -> bool:
        return not self._asked.empty() or bool(self._publish)

    def take_back(self) -> None:
        """Release the leases of the tasks asked for, so that whoever receives the copy can claim it
        (published first, the copy would be dropped as a duplicate of a live lease, and the release
        would then delete the lease: the task would be lost). A Redis failure leaves the lease ours:
        a restart or a sweep requeues it later."""
        while True:
            try:
                task_id, action = self._asked.get_nowait()
            except queue.Empty:
                return
            owner = self.identity.owner if action.own_lease else None
            try:
                text = self.store.requeue_lease(
                    task_id, owner, requeue_grace=REQUEUE_GRACE, refund=action.refund
                )
            except redis.RedisError as exc:
                log.warning("could not requeue %s now: %s", task_id, describe(exc))
                continue
            if text is not None:
                self._publish.append((task_id, Delivery.loads(text)))

    def publish(self, producer: Any) -> None:
        while self._publish:
            task_id, delivery = self._publish[-1]
            broker.publish_scan(producer, self.settings, delivery)
            self._publish.pop()
            with task_context(task_id=task_id):
                log.warning("re-queued the task")

    def send(self, link: BrokerLink, *, caught_up: bool) -> None:
        """On the loop's connection, once the ends Redis missed are recorded (`caught_up`): a requeued
        copy must not be overtaken by them."""
        if link.producer is None or not link.publishable or not caught_up:
            return
        self.take_back()
        self.publish(link.producer)

    def publish_at_stop(self, link: BrokerLink) -> None:
        """The last requeues of a stop, on a connection of their own when the loop's is gone."""
        if not self.pending:
            return
        try:
            producer = link.connect_to_publish()
            self.take_back()
            self.publish(producer)
        except Exception as exc:
            # The leases stay: the next start of this instance (or another instance once they
            # expire) requeues these tasks, so nothing is lost.
            log.warning("could not requeue tasks now (%s); they are recovered from Redis later", exc)
        finally:
            link.drop()


class Leases:
    """Heartbeats and recovery, on the loop thread."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        identity: Identity,
        hub: ObserverHub,
        running: dict[str, TaskRecord],
        *,
        stored: Callable[[str], bool],
        cancel: Callable[[list[str], str], None],
        register_ip: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self.hub = hub
        self.running = running  # the loop's: read here on the loop thread only
        self.stored = stored
        self.cancel = cancel
        self.register_ip = register_ip
        self.node_ttl = settings.lease_ttl * 3
        self.recovered = False
        self._last_heartbeat = self._last_sweep = 0.0
        # task id -> when Redis last confirmed our lease (monotonic): the fence's clock. Only the loop
        # thread reads and writes it.
        self._renewed: dict[str, float] = {}
        self._sweep_not_before = 0.0
        self.hold_sweep(time.monotonic())

    def hold_sweep(self, now: float) -> None:
        """Sweeping other instances' leases waits one lease period after start and after a Redis
        outage: live instances renew within a third of it, so only the truly dead are requeued."""
        self._sweep_not_before = now + self.settings.lease_ttl

    def duties(self, now: float) -> None:
        """The loop's periodic lease work (monotonic `now`); raises RedisError."""
        lease_ttl = self.settings.lease_ttl
        if now - self._last_heartbeat >= lease_ttl / 3:
            self._last_heartbeat = now
            self.heartbeat(now)
        if now - self._last_sweep >= lease_ttl / 2 and now >= self._sweep_not_before:
            self._last_sweep = now
            self.sweep()

    def next_due(self) -> float:
        """When `duties` has work next (monotonic)."""
        lease_ttl = self.settings.lease_ttl
        sweep = max(self._last_sweep + lease_ttl / 2, self._sweep_not_before)
        return min(self._last_heartbeat + lease_ttl / 3, sweep)

    def fence_due(self) -> float | None:
        """When the first running task's lease goes a whole TTL unrenewed (monotonic), if any runs."""
        live = [self._renewed[i] for i in self._live() if i in self._renewed]
        return min(live) + self.settings.lease_ttl if live else None

    def fence(self, now: float) -> None:
        """Stop the scans whose lease Redis has not confirmed for a whole TTL. Runs on every turn of the
        loop, Redis or not: the lease may have expired on Redis's clock by now, and another instance's
        sweep requeues it once it has been expired for one more TTL, so this copy must be gone before
        then. A task first seen here starts its clock now (it was claimed within this turn)."""
        self._renewed = {i: self._renewed.get(i, now) for i in self._live()}
        for task_id, renewed in self._renewed.items():
            if now - renewed < self.settings.lease_ttl:
                continue
            reason = f"lease not renewed for {now - renewed:.0f} s"
            if not self.running[task_id].apply(Event.FENCED, error=reason).view.lease_lost:
                continue  # its report is being stored: see lifecycle
            with task_context(task_id=task_id):
                log.warning("fenced: %s; stopped the scan and dropped its result", reason)

    def _live(self) -> list[str]:
        return [r.task_id for r in self.running.values() if not (r.view.lease_lost or r.view.ended)]

    def heartbeat(self, now: float) -> None:
        self.store.renew_node(self.identity.nodename, self.identity.machine, self.node_ttl)
        ids = self._live()
        if ids:
            lost = self.store.heartbeat(ids, self.identity.owner, self.settings.lease_ttl)
            self._renewed.update((i, now) for i in ids if i not in lost)
            for task_id in lost:
                record = self.running.get(task_id)
                if record is not None and not record.view.ended:
                    # Another worker took the task over (we were frozen past the lease): stop ours.
                    record.apply(Event.LEASE_LOST)
                    with task_context(task_id=task_id):
                        log.warning("lease lost to another worker; stopping this copy of the scan")
        for r in list(self.running.values()):
            task = r.view.task
            if task is None:
                continue
            self.store.refresh_lock(task, ttl=self.settings.lease_ttl * 3)
            # A cancel broadcast is lost while our broadcast queue is gone (broker reconnect); the
            # revoke marker other instances wrote, or Tasker's stop itself, still tells.
            stopped = self.settings.require_task_metadata and self.store.tasker_stopped(r.task_id, task)
            if not r.cancel.is_set() and (stopped or self.store.is_revoked(r.task_id)):
                self.cancel([r.task_id], "a revoke or stop seen in Redis")

    def release_node(self) -> None:
        """At a clean stop: the next start of this name, here or elsewhere, need not wait for the TTL."""
        with contextlib.suppress(redis.RedisError):
            self.store.release_node(self.identity.nodename, self.identity.machine)

    def sweep(self) -> None:
        # Only leases expired for a whole period: a live owner that was briefly slow renews in time.
        # Lease deadlines are on Redis's clock, so a step of this host's wall clock cannot expire them.
        cutoff = self.store.now() - self.settings.lease_ttl
        for task_id in self.store.expired(cutoff):
            if task_id not in self.running:
                self.hub.publish(step(new_task(task_id), Event.LEASE_EXPIRED, time.time(), own_lease=False))

    def recover_once(self) -> None:
        """On the first contact with Redis: register this host's IP, then recover the tasks this
        instance owned when it died (finish what was stored, requeue the rest)."""
        if self.recovered:
            return
        holder = self.store.claim_node(self.identity.nodename, self.identity.machine, self.node_ttl)
        if holder is not None:
            raise ConfigError(
                "HOSTNAME",
                f"node {self.identity.nodename} is already run by {holder}",
                "give each scanner host a unique HOSTNAME (Tasker tells workers apart by it)",
            )
        self.recovered = True
        self.register_ip()
        for task_id in self.store.owned_by(self.identity.owner):
            now = time.time()
            if self.stored(task_id):
                text = self.store.lease_message(task_id)
                view = new_task(task_id, Delivery.loads(text) if text else None)
                with task_context(task_id=task_id):
                    log.info("result of a task interrupted after its scan is stored; finishing it")
                self.hub.publish(step(view, Event.STORED, now))
            else:
                self.hub.publish(step(new_task(task_id), Event.LEASE_EXPIRED, now, own_lease=True))
