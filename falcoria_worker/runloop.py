"""`falcoria-worker run`: one instance's consume loop.

The main thread owns the AMQP connection (kombu channels are not thread-safe) and runs an event loop that
sleeps until a message, a scan's end, a signal or its next timer (connection.py). It consumes Tasker's
scan queue, one private queue on each fanout broadcast exchange (cancel, IP refresh) and the Celery
pidbox (ping, revoke). Scans run on a thread pool; nmap is a subprocess, so threads are all the
parallelism needed. The loop decides nothing about a task: the lifecycle does, and the loop carries out
what it asks (ack, start, requeue).

Why the loop is ours and not a stock Celery worker (also docs/design.md):
- A scan message is acked only after a Redis lease records it, and the consumer is cancelled
  (basic.cancel) while every slot is busy, so no message is ever held unacked during a scan: RabbitMQ's
  consumer_timeout cannot close the channel, and idle instances get the queued work instead.
- The lease makes a killed instance's task recoverable: its owner requeues it at restart, any instance
  requeues it once the lease expires, and a task that keeps killing workers is recorded as failed after
  MAX_ATTEMPTS instead of looping forever.
- Cancels are handled on the loop thread itself, which signals the nmap process group directly, so a
  busy instance still cancels within milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

import redis

from falcoria_worker.admission import Admission
from falcoria_worker.celery_events import CeleryEvents
from falcoria_worker.config import Settings
from falcoria_worker.connection import BrokerLink, Waker
from falcoria_worker.control import Control
from falcoria_worker.delivery import Deliverer
from falcoria_worker.errors import describe
from falcoria_worker.identity import Identity, lock_state_dir
from falcoria_worker.leases import Leases, Requeues
from falcoria_worker.lifecycle import Do, Event
from falcoria_worker.observers import JournalFields, ObserverHub, StatusLine
from falcoria_worker.pipeline import Engine, Plan
from falcoria_worker.recorder import RedisHealth, RedisRecorder
from falcoria_worker.redis_store import RedisStore
from falcoria_worker.reload import Reloader
from falcoria_worker.scanning import Scans
from falcoria_worker.spool import Spool
from falcoria_worker.systemd_notify import Notifier
from falcoria_worker.tasks import TaskRecord

log = logging.getLogger(__name__)

IDLE_WAIT = 5.0  # s the loop sleeps at most: how late a late cleanup queued by the janitor runs
REDIS_PROBE = 1.0  # s between pings of a Redis that stopped answering


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        store: RedisStore,
        notifier: Notifier,
        spool: Spool | None,
        deliverer: Deliverer | None,
        reloader: Reloader,
        hub: ObserverHub | None = None,
        events: CeleryEvents,
    ) -> None:
        self.settings = settings
        self.reloader = reloader
        self.store = store
        self.notifier = notifier
        self.deliverer = deliverer
        self.identity = Identity.of(settings)
        self.state_dir = Path(settings.state_dir)
        self.health = RedisHealth()
        # The tasks this instance runs: the loop thread's only (scan threads report their ends to `scans`).
        self.running: dict[str, TaskRecord] = {}
        self.hub = hub or ObserverHub()
        self.recorder = RedisRecorder(
            store, self.health, nodename=self.identity.nodename, owner=self.identity.owner
        )
        self.requeues = Requeues(settings, store, self.identity)
        self.status_line = StatusLine(notifier, reloader, deliverer)
        self.waker = Waker()  # transitions, scan ends and signals wake the loop (STATUS follows the phases)
        reloader.wake = self.waker.wake
        for observer in (self.recorder, self.requeues, JournalFields(), self.status_line, self.waker):
            self.hub.add(observer)
        self.hub.add_worker(self.status_line)
        self.scans = Scans(
            settings,
            engine=engine,
            store=store,
            health=self.health,
            spool=spool,
            deliverer=deliverer,
            ended=self.waker.wake,
        )
        self.link = BrokerLink(settings, self.identity.nodename)
        self.control = Control(
            settings,
            store,
            self.identity,
            self.running,
            janitor=self.recorder.janitor,
            hub=self.hub,
            link=self.link,
            events=events,
            update_consumption=self._update_consumption,
        )
        self.hub.add(self.control)
        self.admission = Admission(
            settings,
            engine=engine,
            store=store,
            hub=self.hub,
            spool=spool,
            identity=self.identity,
            revoked_here=self.control.is_revoked_here,
            admitted=self._admitted,
        )
        self.leases = Leases(
            settings,
            store,
            self.identity,
            self.hub,
            self.running,
            stored=self.scans.stored,
            cancel=lambda ids, source: self.control.cancel_tasks(ids, source=source, now=time.monotonic()),
            register_ip=self.control.register_ip,
        )
        self.stop_requested = False
        self.ready_sent = False
        self._lock_fd: int | None = None
        self._last_probe = 0.0  # of a Redis that stopped answering

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_state_dir(self.state_dir)
        self.scans.kill_orphans()
        if self.deliverer:
            self.deliverer.start()
        self.hub.worker_event("worker_started")
        try:
            self._loop()
        finally:
            # Also after an unexpected exit: stop the nmap groups and requeue the tasks.
            self._shutdown()
        return 0

    def _loop(self) -> None:
        backoff = 0.5
        while not self.stop_requested:
            try:
                self._ensure_redis()
                self._connect()
                backoff = 0.5
                self._serve()
            except Exception as exc:
                if self.stop_requested:
                    break
                if not self.link.is_connection_error(exc):
                    raise
                self.link.lost()
                reason = describe(exc)
                log.warning("connection problem: %s; retrying in %.1f s", reason, backoff)
                self.notifier.status(self._status_text(reason))
                self._sleep_alive(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self.link.drop()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_requested:
            log.info("received %s: stopping", signal.Signals(signum).name)
        self.stop_requested = True
        self.waker.wake()

    def _sleep_alive(self, seconds: float) -> None:
        """Wait without going silent: the watchdog keeps being fed while we wait for a peer."""
        end = time.monotonic() + seconds
        while not self.stop_requested and (now := time.monotonic()) < end:
            self._collect_ended()
            self.leases.fence(now)
            if self.health.ok:
                # Leases are renewed in a broker outage too: the scans go on, nobody may take them over.
                try:
                    self._redis_duties(now)
                except redis.RedisError:
                    self.health.ok = False
            self.notifier.feed_watchdog(now)
            self.waker.wait(min(self._time_to_next(), end - now))

    def _ensure_redis(self) -> None:
        while not self.stop_requested:
            try:
                self.store.ping()
                if not self.health.ok:
                    log.info("Redis answers")
                self.health.ok = True
                self.leases.recover_once()
                return
            except redis.RedisError as exc:
                self.health.ok = False
                self.notifier.status(f"waiting for Redis: {describe(exc)}")
                log.warning("Redis unavailable: %s", describe(exc))
                self._sleep_alive(1.0)

    def _connect(self) -> None:
        self.link.connect(self._on_scan_message, self._on_broadcast, self.control.handlers())
        self._update_consumption()

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        while not self.stop_requested and self.link.conn is not None:
            self._tick()
            self.link.wait(self._time_to_next(), self.waker)

    def _time_to_next(self) -> float:
        """Seconds until the loop's next timer; messages, a scan's end and a stop wake it sooner."""
        now = time.monotonic()
        timers = [self.notifier.watchdog_due(), self.leases.fence_due(), self.hub.next_due()]
        if self.health.ok:  # Redis's timers wait while it is down: nothing to do but probe it
            timers += [self.leases.next_due(), self.recorder.next_cleanup()]
        elif self.link.ok:  # serving: the tick probes it (a reconnect waits in _ensure_redis)
            timers.append(self._last_probe + REDIS_PROBE)
        due = [t for t in timers if t is not None] + [now + IDLE_WAIT]
        return max(0.0, min(due) - now)

    def _tick(self) -> None:
        now = time.monotonic()
        self.reloader.poll(self)  # SIGHUP: new settings for the tasks admitted from now on
        self._collect_ended()
        self._update_consumption()  # cheap; catches a Redis outage a scan thread reported
        self.leases.fence(now)  # before any Redis call of this turn, each of which may hang seconds
        if not self.health.ok and now - self._last_probe >= REDIS_PROBE:
            self._last_probe = now
            with contextlib.suppress(redis.RedisError):
                self.store.ping()
                self.health.ok = True
                self.leases.hold_sweep(now)
                log.info("Redis is back")
                self._update_consumption()
        if self.health.ok:
            try:
                self._redis_duties(now)
            except redis.RedisError as exc:
                # A Redis outage must not tear down the healthy broker connection: stop taking work
                # and keep serving cancels and pings until Redis answers again.
                log.warning("Redis unavailable: %s; not taking new scans", describe(exc))
                self.health.ok = False
                self._update_consumption()
        self.requeues.send(self.link, caught_up=self.recorder.caught_up)
        if not self.ready_sent and self.link.ok and self.health.ok:
            self.ready_sent = True
            self.hub.worker_event("worker_ready")
        self.notifier.status(self._status_text())
        self.notifier.feed_watchdog(now)
        self.hub.tick(now)

    def _redis_duties(self, now: float) -> None:
        self.recorder.flush()
        self.recorder.run_late_cleanups(now)
        self.leases.duties(now)

    def _status_text(self, broker_down: str | None = None) -> str:
        if broker_down is None and not self.link.ok:
            broker_down = "connecting"
        scans = len(self.running)
        return self.status_line.text(broker_down=broker_down, redis_ok=self.health.ok, scans=scans)

    def _update_consumption(self) -> None:
        """Consume only while a slot is free and Redis answers: nothing waits unacked on a busy worker."""
        want = (
            self.link.ok
            and self.health.ok
            and not self.stop_requested
            and not self.control.draining
            and len(self.running) < self.settings.concurrency
        )
        changed = self.link.consume(want)
        if changed is not None:
            self.hub.worker_event("consuming_changed", changed)

    def _collect_ended(self) -> None:
        ended = [self.running.pop(task_id, None) for task_id in self.scans.take_ended()]
        if any(record is not None for record in ended):
            self._update_consumption()

    # ------------------------------------------------------------------ messages

    def _on_scan_message(self, message: Any) -> None:
        try:
            transition = self.admission.admit(message)
        except redis.RedisError as exc:
            # Without Redis nothing can be recorded: give the message back and stop taking work.
            log.warning("Redis unavailable while accepting a task (%s); message requeued", describe(exc))
            # Consuming stops first: requeued before, it would come back inside basic.cancel, re-entrantly.
            self.health.ok = False
            self._update_consumption()
            message.requeue()
        except Exception as exc:
            if self.link.is_connection_error(exc):
                raise
            self._drop_unhandled(message, "scan message")
        else:
            if transition.has(Do.ACK):
                message.ack()

    def _on_broadcast(self, message: Any) -> None:
        try:
            self.control.on_broadcast(message)
        except Exception as exc:
            if self.link.is_connection_error(exc):
                raise
            self._drop_unhandled(message, "broadcast")

    def _drop_unhandled(self, message: Any, what: str) -> None:
        """Logged and dropped: unacked, a message we cannot handle would take down every instance."""
        log.exception("could not handle a %s; dropped it", what)
        with contextlib.suppress(Exception):
            message.ack()

    def _admitted(self, record: TaskRecord, plan: Plan) -> None:
        self.running[record.task_id] = record
        # Stop consuming before the caller acks: with prefetch 1 nothing else can arrive in between.
        self._update_consumption()
        self.scans.start(record, plan)

    def _shutdown(self) -> None:
        self.hub.worker_event("worker_stopping")
        for record in list(self.running.values()):
            record.apply(Event.STOPPING)
        self.scans.stop()
        self.recorder.close()
        self._collect_ended()
        self.requeues.publish_at_stop(self.link)
        if not self.requeues.pending and self.health.ok:  # else the claim guards the leases left
            self.leases.release_node()
        if self.deliverer:
            self.deliverer.stop(timeout=5.0)
        log.info("stopped")
