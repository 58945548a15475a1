"""`falcoria-worker run`: one instance's consumer loop.

The main thread owns the AMQP connection (kombu channels are not thread-safe) and runs a short-timeout
event loop: it consumes Tasker's scan queue, one private queue on each fanout broadcast exchange
(cancel, IP refresh) and the Celery pidbox (ping, revoke). Scans run on a thread pool; nmap is a
subprocess, so threads are all the parallelism needed.

Why the loop is ours and not a stock Celery worker (see also docs/design.md):
- A scan message is acked only after a Redis lease records it, and the consumer is cancelled
  (basic.cancel) while every slot is busy, so no message is ever held unacked during a scan: RabbitMQ's
  consumer_timeout cannot close the channel, and idle instances get the queued work instead.
- The lease makes a killed instance's task recoverable: its owner re-publishes it at restart, any
  instance re-publishes it once the lease expires, and a task that keeps killing workers is recorded
  as failed after MAX_ATTEMPTS instead of looping forever.
- Cancels are handled on the loop thread itself, which signals the nmap process group directly, so a
  busy instance still cancels within milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import heapq
import itertools
import logging
import os
import queue
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from kombu import Connection, Consumer, Producer

from falcoria_worker import broker, protocol, runner
from falcoria_worker.broker import RawMessage
from falcoria_worker.config import Settings
from falcoria_worker.errors import Cancelled, ConfigError, Rejected, ScanFailed, ScanInterrupted
from falcoria_worker.logs import set_phase, task_context
from falcoria_worker.model import Phase, ScanTask, TaskState, parse_cancel, parse_task, valid_task_id
from falcoria_worker.netaddr import default_route_source_ip, echo_ip
from falcoria_worker.pipeline import Engine, Plan
from falcoria_worker.runner import NmapProcess
from falcoria_worker.service import Notifier
from falcoria_worker.spool import Deliverer, Spool, SpoolEntry
from falcoria_worker.state import RedisState

log = logging.getLogger(__name__)

SCAN_TASK = "project.nmap.scan"
CANCEL_TASK = "project.nmap.cancel"
UPDATE_IP_TASK = "worker.update_ip"

LOOP_TIMEOUT = 0.05  # s drain_events may block: how late a freed slot or a stop is seen (idle: 7 ms/s)
PROGRESS_WRITE_INTERVAL = 1.0
METADATA_GRACE = 3.0  # seconds to wait for Tasker's tracking keys, written right after it publishes
REPUBLISH_GRACE = 3600.0  # a re-published task nobody claimed by then is re-published again
LATE_CLEANUP = 60.0  # seconds after which a rejected task whose tracking came late is cleaned again
LATER_MAX = 10_000  # late cleanups kept at most (a flood of forged messages must not exhaust memory)
TERMINAL_STATES = frozenset({TaskState.COMPLETED.value, TaskState.FAILED.value, TaskState.CANCELLED.value})
REVOKED_MEMORY = 10_000  # revoked ids kept in memory (Celery keeps 50,000; Redis holds them too)


@dataclass
class TaskEnd:
    """How a scan thread's task ended, kept until Redis has recorded it (replayed after an outage)."""

    state: TaskState
    error: str | None = None
    delivery: str | None = None
    stored: bool = False  # the result is in the spool or results dir: the task is finished
    requeue: bool = False  # nmap was killed from outside: run it again through the lease
    keep_lock: bool = False  # Tasker's lock is not ours to delete (Tasker stopped the task)


@dataclass
class Running:
    task_id: str
    task: ScanTask
    raw: RawMessage
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # cancelled by our own stop: hand back instead of recording "cancelled"
    lease_lost: bool = False
    finished: bool = False  # the scan thread is recording the end; the lease is released with it
    proc: NmapProcess | None = None
    phase: Phase | None = None
    detail: str = "starting"
    percent: float | None = None
    last_progress_write: float = 0.0


def _logged(fn: Callable[..., None]) -> Callable[..., None]:
    """Pool work whose exceptions are logged: an executor keeps them in a future nobody reads."""

    @functools.wraps(fn)
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s failed", fn.__name__)

    return run


def machine_id() -> str:
    """systemd's machine id, or the boot id where there is none (a container without /etc/machine-id)."""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if text:
                return text
    return "unknown-machine"


def current_ip(settings: Settings) -> str | None:
    """The IP Tasker shows for this worker: configured, else the operator's echo URL, else the local
    source address of the default route. Never a third-party service."""
    if settings.worker_ip:
        return str(settings.worker_ip)
    if settings.ip_echo_url:
        try:
            return echo_ip(settings.ip_echo_url, timeout=5.0)
        except Exception as exc:  # an echo outage must not stop registration: fall back to the route
            log.warning("IP echo URL failed (%s); using the default route's source address", exc)
    return default_route_source_ip()


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        state: RedisState,
        notifier: Notifier,
        spool: Spool | None,
        deliverer: Deliverer | None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.state = state
        self.notifier = notifier
        self.spool = spool
        self.deliverer = deliverer
        self.nodename = f"{settings.node_name}@{settings.hostname}"
        self.owner = self.nodename  # lease owner: stable across restarts of the same instance
        # Who runs this node: the machine and the state dir, so a restart here is recognised as us.
        self.identity = f"{machine_id()}:{settings.state_dir}"
        self._node_ttl = settings.lease_ttl * 3
        self._lock_fd: int | None = None
        self.state_dir = Path(settings.state_dir)
        self.results_dir = self.state_dir / "results"
        self.work_root = self.state_dir / "work"

        self.running: dict[str, Running] = {}
        self.revoked: dict[str, float] = {}
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.handbacks: list[Running] = []
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="scan")
        # Finishing rejected tasks waits for Tasker's tracking keys; that must not hold a scan slot.
        self.janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="janitor")
        self._backlog_lock = threading.Lock()
        self.stop_requested = False
        self.redis_ok = False
        self.broker_ok = False
        self.conn: Connection | None = None
        self.scan_consumer: Consumer | None = None
        self.consuming = False
        self.ready_sent = False
        self._last_watchdog = 0.0
        self._last_heartbeat = 0.0
        self._last_sweep = 0.0
        self._last_redis_probe = 0.0
        self._redis_backlog: list[tuple[Running, TaskEnd]] = []
        self._pending_republish: list[tuple[str, RawMessage]] = []
        self._recovered = False
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._later_seq = itertools.count()
        self._later_lock = threading.Lock()
        # Sweeping other instances' leases waits one lease period after start and after a Redis
        # outage: live instances renew within a third of it, so only the truly dead are re-queued.
        self._sweep_not_before = time.monotonic() + settings.lease_ttl

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        self._kill_orphans()
        if self.deliverer:
            self.deliverer.start()
        self.notifier.status("starting")
        try:
            self._loop()
        finally:
            # Also after an unexpected exit: stop the nmap groups and hand the tasks back.
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
                if not self._is_connection_error(exc):
                    raise
                self.broker_ok = False
                self.consuming = False
                reason = self._describe(exc)
                log.warning("connection problem: %s; retrying in %.1f s", reason, backoff)
                self.notifier.status(self._outage_status(reason))
                self._sleep_alive(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self._drop_connection()

    def _lock_state_dir(self) -> None:
        """One `run` per state directory: a second one (the same instance started by hand beside the
        unit) would kill the first one's nmap as an orphan and take over its leases."""
        fd = os.open(self.state_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                "STATE_DIR",
                f"{self.state_dir} is in use by another falcoria-worker run (the same instance twice?)",
                "stop the other one, or give this one its own INSTANCE",
            ) from None
        self._lock_fd = fd  # held until the process exits

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_requested:
            log.info("received %s: stopping", signal.Signals(signum).name)
        self.stop_requested = True

    def _sleep_alive(self, seconds: float) -> None:
        """Wait without going silent: the watchdog keeps being fed while we wait for a peer."""
        end = time.monotonic() + seconds
        while not self.stop_requested and time.monotonic() < end:
            self._collect_events()
            if self.redis_ok:
                # Leases are renewed during a broker outage too: the scans go on, and other instances
                # must not take them over.
                try:
                    self._redis_duties(time.monotonic())
                except redis.RedisError:
                    self.redis_ok = False
            self._feed_watchdog()
            time.sleep(min(LOOP_TIMEOUT, max(0.0, end - time.monotonic())))

    # ------------------------------------------------------------------ connections

    def _ensure_redis(self) -> None:
        while not self.stop_requested:
            try:
                self.state.ping()
                if not self.redis_ok:
                    log.info("Redis answers")
                self.redis_ok = True
                self._startup_recovery_once()
                return
            except redis.RedisError as exc:
                self.redis_ok = False
                self.notifier.status(f"waiting for Redis: {self._describe(exc)}")
                log.warning("Redis unavailable: %s", self._describe(exc))
                self._sleep_alive(1.0)

    def _connect(self) -> None:
        s = self.settings
        self.conn = broker.connect(s)
        channel = self.conn.channel()
        self.scan_consumer = Consumer(
            channel,
            queues=[broker.scan_queue(s)],
            on_message=self._on_scan_message,
            no_ack=False,
            prefetch_count=1,
        )
        self.scan_consumer.declare()
        # Tasker never declares the fanout exchanges; its first broadcast fails unless a worker has.
        for name in (s.nmap_cancel_queue_name, s.worker_service_broadcast_queue):
            queue = broker.broadcast_queue(name)
            Consumer(channel, queues=[queue], on_message=self._on_broadcast, no_ack=True).consume()
        broker.listen_control(
            self.conn,
            channel,
            self.nodename,
            {"ping": self._pidbox_ping, "revoke": self._pidbox_revoke, "active": self._pidbox_active},
        )
        self.producer = Producer(channel)
        self.broker_ok = True
        self.consuming = False
        self._update_consumption()
        log.info("consuming %s as %s", s.nmap_scan_queue_name, self.nodename)

    def _drop_connection(self) -> None:
        if self.conn is not None:
            # A dead connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                self.conn.release()
        self.conn = None
        self.scan_consumer = None
        self.consuming = False

    def _is_connection_error(self, exc: BaseException) -> bool:
        errors: tuple[type[BaseException], ...] = (OSError, redis.RedisError)
        if self.conn is not None:
            errors += tuple(self.conn.connection_errors) + tuple(self.conn.channel_errors)
        from kombu.exceptions import OperationalError

        return isinstance(exc, (*errors, OperationalError))

    @staticmethod
    def _describe(exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        return text.splitlines()[0][:200]

    def _outage_status(self, reason: str) -> str:
        scans = len(self.running)
        busy = f"; {scans} scan(s) continue" if scans else ""
        return f"reconnecting to RabbitMQ: {reason}{busy}"

    # ------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        conn = self.conn
        if conn is None:
            return
        while not self.stop_requested:
            self._tick()
            with contextlib.suppress(TimeoutError):  # nothing arrived: tick again
                conn.drain_events(timeout=LOOP_TIMEOUT)
            conn.heartbeat_check()

    def _tick(self) -> None:
        now = time.monotonic()
        self._collect_events()
        self._send_handbacks()
        self._update_consumption()  # cheap; catches a Redis outage a scan thread reported
        if not self.redis_ok and now - self._last_redis_probe >= 1.0:
            self._last_redis_probe = now
            with contextlib.suppress(redis.RedisError):
                self.state.ping()
                self.redis_ok = True
                self._sweep_not_before = now + self.settings.lease_ttl
                log.info("Redis is back")
                self._update_consumption()
        if self.redis_ok:
            try:
                self._redis_duties(now)
            except redis.RedisError as exc:
                # A Redis outage must not tear down the healthy broker connection: stop taking work
                # and keep serving cancels and pings until Redis answers again.
                log.warning("Redis unavailable: %s; not taking new scans", self._describe(exc))
                self.redis_ok = False
                self._update_consumption()
        if not self.ready_sent and self.broker_ok and self.redis_ok:
            self.ready_sent = True
            self.notifier.ready(self._status_text())
        self.notifier.status(self._status_text())
        self._feed_watchdog()

    def redis_failed(self, exc: BaseException) -> None:
        """Any thread that finds Redis gone says so; the loop stops taking work at its next tick and
        STATUS tells the truth from then on (the loop's own Redis calls may be seconds away)."""
        if self.redis_ok:
            self.redis_ok = False
            log.warning("Redis unavailable: %s; not taking new scans", self._describe(exc))

    def _redis_duties(self, now: float) -> None:
        self._flush_redis_backlog()
        self._run_late_cleanups(now)
        lease_ttl = self.settings.lease_ttl
        if now - self._last_heartbeat >= lease_ttl / 3:
            self._last_heartbeat = now
            self.state.renew_node(self.nodename, self.identity, self._node_ttl)
            self._heartbeat_leases()
        if now - self._last_sweep >= lease_ttl / 2 and now >= self._sweep_not_before:
            self._last_sweep = now
            self._recover_expired()

    def _feed_watchdog(self) -> None:
        # Fed only from the loop itself: if the loop hangs (deadlock, SIGSTOP), systemd restarts us.
        interval = self.notifier.watchdog_interval()
        now = time.monotonic()
        if interval and now - self._last_watchdog >= min(interval, 1.0):
            self._last_watchdog = now
            self.notifier.watchdog()

    def _status_text(self) -> str:
        if not self.broker_ok:
            return self._outage_status("connecting")
        if not self.redis_ok:
            busy = f"; {len(self.running)} scan(s) continue" if self.running else ""
            return f"waiting for Redis; not taking new scans{busy}"
        if not self.running:
            return "idle"
        parts = []
        for r in self.running.values():
            if r.phase is Phase.PORTS:
                pct = f" {r.percent:.0f}%" if r.percent is not None else ""
                parts.append(f"scanning {r.task.ip}: open ports{pct}")
            elif r.phase is Phase.SERVICES:
                pct = f" {r.percent:.0f}%" if r.percent is not None else ""
                parts.append(f"{r.detail}{pct}")
            else:
                parts.append(f"{r.task.ip}: {r.detail}")
        return "; ".join(parts)

    def _update_consumption(self) -> None:
        """Consume only while a slot is free and Redis answers: nothing waits unacked on a busy worker."""
        if self.scan_consumer is None:
            return
        want = (
            self.broker_ok
            and self.redis_ok
            and not self.stop_requested
            and len(self.running) < self.settings.concurrency
        )
        if want and not self.consuming:
            self.scan_consumer.consume()
            self.consuming = True
        elif not want and self.consuming:
            self.scan_consumer.cancel()
            self.consuming = False

    def _collect_events(self) -> None:
        changed = False
        while True:
            try:
                kind, task_id = self.events.get_nowait()
            except queue.Empty:
                break
            if kind == "done":
                running = self.running.pop(task_id, None)
                if running is not None and running.shutdown:
                    self.handbacks.append(running)
                changed = True
            elif kind == "requeue":
                try:
                    self._republish_lease(task_id, owner_hint=self.owner)
                except redis.RedisError as exc:
                    # The lease stays ours and expires: a later sweep re-publishes the task.
                    log.warning("could not re-queue %s now: %s", task_id, self._describe(exc))
        if changed:
            self._update_consumption()

    # ------------------------------------------------------------------ scan messages

    def _on_scan_message(self, message: Any) -> None:
        try:
            self._accept_scan(message, RawMessage.from_kombu(message))
        except redis.RedisError as exc:
            # Without Redis nothing can be recorded: give the message back and stop taking work.
            log.warning(
                "Redis unavailable while accepting a task (%s); message returned to the queue",
                self._describe(exc),
            )
            message.requeue()
            self.redis_ok = False
            self._update_consumption()
        except Exception as exc:
            if self._is_connection_error(exc):
                raise
            self._drop_unhandled(message, "scan message")

    def _drop_unhandled(self, message: Any, what: str) -> None:
        """A message we cannot handle must not take the worker down: unacked, it would be redelivered to
        the next instance and take that one down too. Log it with its traceback and drop it."""
        log.exception("could not handle a %s; dropped it", what)
        with contextlib.suppress(Exception):
            message.ack()

    def _accept_scan(self, message: Any, raw: RawMessage) -> None:
        """Decide what to do with one scan message; every path but a Redis outage acks it."""
        parsed = self._parse_scan(message)
        if parsed is not None:
            task_id, task = parsed
            with task_context(task_id=task_id, project_id=task.project, target=task.ip):
                self._admit(task_id, task, raw)
        message.ack()

    def _parse_scan(self, message: Any) -> tuple[str, ScanTask] | None:
        """The task of a well-formed scan message; None (with the reason logged and stored) otherwise."""
        try:
            decoded = protocol.decode_task_message(
                message.headers or {}, message.body, message.content_type, message.content_encoding
            )
        except Rejected as exc:
            task_id = str((message.headers or {}).get("id") or "")[:64]
            with task_context(task_id=task_id or None):
                log.error("rejected an undecodable message: %s", exc.reason)
            if task_id and valid_task_id(task_id):
                self.state.set_status(task_id, TaskState.FAILED, error=f"rejected: {exc.reason}")
            return None
        task_id = decoded.task_id
        if decoded.name != SCAN_TASK:
            log.error("task %s on the scan queue is not %s; dropped", decoded.name[:100], SCAN_TASK)
            return None
        data = decoded.args[0] if len(decoded.args) == 1 else None
        try:
            return task_id, parse_task(data)
        except Rejected as exc:
            with task_context(task_id=task_id):
                log.error("rejected task: %s", exc.reason)
            self.state.set_status(task_id, TaskState.FAILED, error=f"rejected: {exc.reason}")
            self.janitor.submit(_logged(self._clean_rejected), task_id, data)
            return None

    def _admit(self, task_id: str, task: ScanTask, raw: RawMessage) -> None:
        """Skip, refuse or start a parsed task. The caller acks afterwards."""
        skip = self._skip_reason(task_id, task)
        if skip is not None:
            log.warning("not scanning: %s", skip)
            return
        verdict = self.state.claim(
            task_id, self.owner, self.settings.lease_ttl, raw.dumps(), self.settings.max_attempts
        )
        if verdict == "busy":
            log.warning("duplicate delivery of a task another worker is running; dropped")
            return
        if verdict == "poison":
            reason = f"gave up after {self.settings.max_attempts} attempts: the worker died each time"
            log.error("%s", reason)
            self.janitor.submit(_logged(self._finish_rejected), task_id, task, reason)
            return
        try:
            plan = self.engine.prepare(task)
        except (Rejected, ScanFailed) as exc:
            reason = exc.reason if isinstance(exc, Rejected) else str(exc)
            log.error("rejected task: %s", reason)
            self.janitor.submit(_logged(self._finish_rejected), task_id, task, f"rejected: {reason}")
            return
        self.state.mark_running(task_id, task, started_at=int(time.time()), worker=self.nodename)
        self.state.set_status(task_id, TaskState.RECEIVED, worker=self.nodename)
        running = Running(task_id, task, raw)
        self.running[task_id] = running
        # Stop consuming before the caller acks: with prefetch 1 nothing else can arrive in between.
        self._update_consumption()
        log.info("received scan of %s (mode %s, timeout %d s)", task.ip, task.mode.value, task.timeout)
        self.pool.submit(_logged(self._execute), running, plan)

    def _skip_reason(self, task_id: str, task: ScanTask) -> str | None:
        finished = self.state.get_status(task_id).get("state")
        if finished in TERMINAL_STATES:
            # A redelivered copy of a task that already ended (e.g. re-queued by a crash between the
            # hand-back publish and the lease release): nothing of it is left to touch.
            return f"duplicate delivery of a task that already ended ({finished})"
        if self.state.was_delivered(task_id) or (self.spool is not None and self.spool.has(task_id)):
            return "duplicate delivery of a task whose result is already delivered or spooled"
        if task_id in self.revoked or self.state.is_revoked(task_id):
            # Tasker's stop removed the lock already; a rescan may hold a new one by now.
            self.state.cleanup(task_id, task, include_lock=False)
            self.state.set_status(task_id, TaskState.CANCELLED, error="revoked before it started")
            return "revoked before it started"
        return None

    def _await_tracking(self, task_id: str, task: ScanTask | None = None) -> bool:
        """Tasker takes its lock, publishes, and only then writes the metadata and the task sets, so a
        quick worker can get here first. Wait briefly for them, so that our cleanup never runs before
        Tasker's writes (which would leave Tasker counting the task forever). No wait when Tasker has
        clearly stopped the task (metadata and lock both gone) or the publisher is not Tasker. False when
        the grace ran out without either."""
        deadline = time.monotonic() + METADATA_GRACE
        while time.monotonic() < deadline:
            if self.state.metadata_exists(task_id):
                return True
            if task is not None and self.state.tasker_stopped(task_id, task):
                return True  # nothing more will come: Tasker's stop removed its keys
            # Without a parsed task there is no lock to look at: only the metadata can end the wait.
            time.sleep(0.005 if task is not None else 0.05)
        return False

    def _clean_again_later(self, clean: Callable[[], None]) -> None:
        """Tasker tracks a big batch's tasks only after publishing all of them, which can take longer
        than the grace: a task rejected meanwhile is cleaned once more when that has surely happened,
        or Tasker's SADDs land after our SREMs and it counts the task forever. The loop runs these
        (a heap, not a thread each: a flood of forged messages must not become a flood of threads)."""
        with self._later_lock:
            if len(self._later) >= LATER_MAX:
                log.warning("too many late cleanups queued; dropping the oldest")
                heapq.heappop(self._later)
            heapq.heappush(self._later, (time.monotonic() + LATE_CLEANUP, next(self._later_seq), clean))

    def _run_late_cleanups(self, now: float) -> None:
        while True:
            with self._later_lock:
                if not self._later or self._later[0][0] > now:
                    return
                item = heapq.heappop(self._later)
            try:
                item[2]()
            except redis.RedisError:
                with self._later_lock:
                    heapq.heappush(self._later, item)
                raise

    def _clean_rejected(self, task_id: str, data: object) -> None:
        with task_context(task_id=task_id):
            try:
                # No waiting here: a payload we cannot parse gives no lock to tell a late Tasker from a
                # forger who never writes metadata, and waiting held up every other rejection.
                if not self.state.metadata_exists(task_id):
                    self._clean_again_later(lambda: self.state.cleanup_partial(task_id, data))
                self.state.cleanup_partial(task_id, data)
            except redis.RedisError as exc:
                log.warning("cleanup of a rejected task failed: %s", exc)

    def _finish_rejected(self, task_id: str, task: ScanTask, reason: str) -> None:
        with task_context(task_id=task_id, project_id=task.project, target=task.ip):
            try:
                if not self._await_tracking(task_id, task):
                    # The first cleanup removes the lock; a rescan may hold a new one a minute later.
                    self._clean_again_later(lambda: self.state.cleanup(task_id, task, include_lock=False))
                self._finish_redis(task_id, task, TaskState.FAILED, error=reason)
            except redis.RedisError as exc:
                log.warning("cleanup of a rejected task failed: %s", exc)

    # ------------------------------------------------------------------ scan threads

    def _execute(self, running: Running, plan: Plan) -> None:
        task, task_id = running.task, running.task_id
        with task_context(task_id=task_id, project_id=task.project, target=task.ip):
            end = TaskEnd(TaskState.FAILED)
            workdir = self.work_root / task_id
            try:
                self._await_tracking(task_id, task)
                if self.settings.require_task_metadata and self.state.tasker_stopped(task_id, task):
                    end.keep_lock = True  # Tasker's stop removed it; a rescan may own that lock now
                    raise Cancelled("stopped by Tasker: its metadata and lock are gone")
                outcome = self.engine.execute(plan, workdir, running.cancel, _Hooks(self, running))
                if running.lease_lost:
                    raise Cancelled("another worker took the task over")  # it delivers, not us
                end.delivery = self._store(task_id, task, outcome.report)
                # Stored: from here on the task is finished, whatever happens to this process.
                end.stored, end.state = True, TaskState.COMPLETED
                end.error = "; ".join(outcome.notes) or None
                log.info(
                    "scan finished: %d open port(s)%s",
                    len(outcome.open_ports),
                    f" ({end.error})" if end.error else "",
                )
            except ScanInterrupted as exc:
                log.warning("%s; re-queueing the task", exc)
                end.requeue, end.error = True, str(exc)
            except redis.RedisError as exc:
                # Not the task's fault either: run it again once Redis is back (through the lease).
                self.redis_failed(exc)
                end.requeue, end.error = not end.stored, f"Redis unavailable: {self._describe(exc)}"
                if end.stored:
                    end.state, end.error = TaskState.COMPLETED, None
            except Cancelled as exc:
                end.state, end.error = TaskState.CANCELLED, str(exc)
                end.keep_lock = end.keep_lock or not self._lock_is_ours(task_id)
                log.info("%s", "stopped by shutdown; handing the task back" if running.shutdown else exc)
            except (Rejected, ScanFailed) as exc:
                end.error = exc.reason if isinstance(exc, Rejected) else str(exc)
                log.error("scan failed: %s", end.error)
            except Exception as exc:  # a bug must fail one task, not the worker
                end.error = f"internal error: {type(exc).__name__}: {exc}"
                log.exception("scan failed with an internal error")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            running.finished = True  # its lease is ours to release now: no "lease lost" alarms
            try:
                self._finalize(running, end)
            except redis.RedisError as exc:
                log.warning("Redis unavailable at the end of the task (%s); cleanup deferred", exc)
                with self._backlog_lock:
                    self._redis_backlog.append((running, end))
            self.events.put(("done", task_id))

    def _lock_is_ours(self, task_id: str) -> bool:
        """Tasker's stop deletes a task's metadata and lock together before it broadcasts the cancel.
        Metadata still there means no stop ran (a bare cancel): the lock is this task's to delete.
        Metadata gone means the lock is gone too, or belongs to a rescan queued since: keep it."""
        try:
            return self.state.metadata_exists(task_id)
        except redis.RedisError:
            return False  # in doubt, leave the lock to its TTL

    def _finalize(self, running: Running, end: TaskEnd) -> None:
        """The Redis side of a task's end. Raises RedisError (the caller defers it to the backlog)."""
        task_id = running.task_id
        if not end.stored and (running.shutdown or running.lease_lost):
            # Not ours to finish: the task goes back to the queue (shutdown) or another worker owns
            # it now (lease lost). Only our own traces are removed.
            self.state.clear_running(task_id)
        elif end.requeue:
            # Through the lease, so the next claim counts an attempt (poison stays bounded).
            self.state.clear_running(task_id)
            self.state.set_status(task_id, TaskState.QUEUED, error=f"re-queued: {end.error}")
            self.events.put(("requeue", task_id))  # the loop thread owns the publishing
        else:
            self._finish_redis(
                task_id,
                running.task,
                end.state,
                error=end.error,
                delivery=end.delivery,
                include_lock=not end.keep_lock,
            )

    def _store(self, task_id: str, task: ScanTask, report: Path | None) -> str | None:
        """Make the result durable before the lease is released (exactly-once hinges on this order).
        Returns the delivery text for the task's status, None when the deliverer reports it."""
        if report is None:
            return "nothing to import"
        if self.spool is not None:
            if self.spool.has(task_id):
                # A re-run of a task whose result is already waiting (the lease outlived a crash
                # right after the spool write): deliver that one, never two.
                log.warning("a result for this task is already spooled; keeping it")
                return None
            self.spool.put(
                task_id, report, project=task.project, mode=task.mode.value, track_history=task.track_history
            )
            # Written before the deliverer is woken, so a fast "delivered" is never overwritten.
            with contextlib.suppress(redis.RedisError):
                self.state.set_status_fields(task_id, delivery="pending")
            if self.deliverer:
                self.deliverer.wake()
            return None
        self.results_dir.mkdir(parents=True, exist_ok=True)
        target = self.results_dir / f"{task_id}.xml"
        shutil.move(str(report), target)
        return f"stored in {target}"

    def _finish_redis(
        self,
        task_id: str,
        task: ScanTask,
        state: TaskState,
        *,
        error: str | None = None,
        delivery: str | None = None,
        include_lock: bool = True,
    ) -> None:
        extra = {"delivery": delivery} if delivery else {}
        self.state.cleanup(task_id, task, include_lock=include_lock)
        self.state.set_status(task_id, state, error=error, worker=self.nodename, **extra)
        self.state.release(task_id, self.owner)

    def _flush_redis_backlog(self) -> None:
        with self._backlog_lock:
            backlog, self._redis_backlog = self._redis_backlog, []
        for i, (running, end) in enumerate(backlog):
            try:
                self._finalize(running, end)
            except redis.RedisError:
                with self._backlog_lock:
                    self._redis_backlog[:0] = backlog[i:]
                self.redis_ok = False
                return

    # ------------------------------------------------------------------ broadcasts and pidbox

    def _on_broadcast(self, message: Any) -> None:
        try:
            self._handle_broadcast(message)
        except Exception as exc:
            if self._is_connection_error(exc):
                raise
            self._drop_unhandled(message, "broadcast")

    def _handle_broadcast(self, message: Any) -> None:
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
            self.cancel_tasks(ids, source="cancel broadcast")
        elif decoded.name == UPDATE_IP_TASK:
            self.janitor.submit(_logged(self.register_ip))  # an echo URL may take seconds: not on the loop
        else:
            log.warning("ignored broadcast task %s", decoded.name[:100])

    def cancel_tasks(self, ids: tuple[str, ...] | list[str], *, source: str) -> None:
        now = time.monotonic()
        for task_id in ids:
            self._remember_revoked(task_id, now)
            running = self.running.get(task_id)
            if running is not None:
                running.cancel.set()
                proc = running.proc
                if proc is not None:
                    proc.cancel()  # SIGTERM to the group right now, from this thread
                with task_context(task_id=task_id, target=running.task.ip):
                    log.info("cancelled by %s", source)
        try:
            self.state.mark_revoked(list(ids))
        except redis.RedisError as exc:
            log.warning("could not record revoked ids in Redis: %s", exc)

    def _remember_revoked(self, task_id: str, now: float) -> None:
        self.revoked[task_id] = now
        if len(self.revoked) > REVOKED_MEMORY:
            for old in sorted(self.revoked, key=self.revoked.__getitem__)[: REVOKED_MEMORY // 10]:
                del self.revoked[old]

    def _pidbox_ping(self, _state: object, **_kwargs: Any) -> dict[str, str]:
        return {"ok": "pong"}

    def _pidbox_revoke(self, _state: object, task_id: str | list[str] | None = None, **_kwargs: Any) -> dict:
        ids = [task_id] if isinstance(task_id, str) else [t for t in (task_id or []) if isinstance(t, str)]
        ids = [t for t in ids if valid_task_id(t)]
        self.cancel_tasks(ids, source="revoke")
        return {"ok": f"tasks {', '.join(ids)} flagged as revoked"}

    def _pidbox_active(self, _state: object, **_kwargs: Any) -> list[dict[str, Any]]:
        return [
            {
                "id": r.task_id,
                "name": SCAN_TASK,
                "hostname": self.nodename,
                "target": r.task.ip,
                "phase": r.phase.value if r.phase else "received",
                "percent": r.percent,
            }
            for r in self.running.values()
        ]

    def register_ip(self) -> None:
        ip = current_ip(self.settings)
        if ip is None:
            log.warning("no IP to register: set WORKER_IP (no default route found)")
            return
        try:
            self.state.register_ip(ip)
            log.info("registered worker IP %s", ip)
        except redis.RedisError as exc:
            log.warning("could not register the worker IP: %s", exc)

    # ------------------------------------------------------------------ leases and recovery

    def _heartbeat_leases(self) -> None:
        ids = [r.task_id for r in self.running.values() if not (r.lease_lost or r.finished)]
        if not ids:
            return
        lost = self.state.heartbeat(ids, self.owner, self.settings.lease_ttl)
        for task_id in lost:
            running = self.running.get(task_id)
            if running is not None and not running.finished:
                # Another worker took the task over (we were frozen past the lease): stop ours.
                running.lease_lost = True
                running.cancel.set()
                if running.proc is not None:
                    running.proc.cancel()
                with task_context(task_id=task_id):
                    log.warning("lease lost to another worker; stopping this copy of the scan")
        for r in list(self.running.values()):
            self.state.refresh_lock(r.task, ttl=self.settings.lease_ttl * 3)
            # A cancel broadcast is lost while our broadcast queue is gone (broker reconnect); the
            # revoke marker other instances wrote, or Tasker's stop itself, still tells.
            stopped = self.settings.require_task_metadata and self.state.tasker_stopped(r.task_id, r.task)
            if not r.cancel.is_set() and (stopped or self.state.is_revoked(r.task_id)):
                self.cancel_tasks([r.task_id], source="a revoke or stop seen in Redis")

    def _recover_expired(self) -> None:
        # Only leases expired for a whole period: a live owner that was briefly slow renews in time.
        for task_id in self.state.expired(self.state.now() - self.settings.lease_ttl):
            if task_id in self.running:
                continue
            self._republish_lease(task_id, owner_hint=None)

    def _startup_recovery_once(self) -> None:
        """On the first contact with Redis: register this host's IP, then recover the tasks this
        instance owned when it died (deliver what was stored, re-queue the rest)."""
        if self._recovered:
            return
        holder = self.state.claim_node(self.nodename, self.identity, self._node_ttl)
        if holder is not None:
            raise ConfigError(
                "HOSTNAME",
                f"node {self.nodename} is already run by {holder}",
                "give each scanner host a unique HOSTNAME (Tasker tells workers apart by it)",
            )
        self._recovered = True
        self.register_ip()
        for task_id in self.state.owned_by(self.owner):
            stored = (self.spool is not None and self.spool.has(task_id)) or (
                self.results_dir / f"{task_id}.xml"
            ).exists()
            if stored:
                raw = self.state.lease_message(task_id)
                task = self._task_from_raw(raw)
                with task_context(task_id=task_id):
                    log.info("result of a task interrupted after its scan is stored; finishing it")
                if task is not None:
                    self._finish_redis(task_id, task, TaskState.COMPLETED)
                else:
                    self.state.release(task_id, self.owner)
            else:
                self._republish_lease(task_id, owner_hint=self.owner)

    def _republish_lease(self, task_id: str, owner_hint: str | None, *, refund: bool = False) -> None:
        text = self.state.reclaim(task_id, owner_hint, republish_grace=REPUBLISH_GRACE, refund=refund)
        if text is None:
            return
        self._pending_republish.append((task_id, RawMessage.loads(text)))

    def _send_handbacks(self) -> None:
        if self.conn is None or not self.broker_ok:
            return
        while self.handbacks:
            task_id = self.handbacks.pop().task_id
            try:
                # Released *before* it is published: another instance that receives the copy at once
                # must be able to claim it (publishing first lost the task: the copy was dropped as a
                # duplicate and the release then deleted the lease).
                self._republish_lease(task_id, owner_hint=self.owner, refund=True)
                self.state.set_status(task_id, TaskState.QUEUED, error="handed back at shutdown")
            except redis.RedisError as exc:
                # The lease stays ours: this instance's next start (or a sweep) re-queues the task.
                log.warning("could not hand %s back now: %s", task_id, self._describe(exc))
        while self._pending_republish:
            task_id, raw = self._pending_republish[-1]
            self._publish(raw)
            self._pending_republish.pop()
            with task_context(task_id=task_id):
                log.warning("re-queued the task")

    def _publish(self, raw: RawMessage) -> None:
        broker.publish_scan(self.producer, self.settings, raw)

    def _task_from_raw(self, text: str | None) -> ScanTask | None:
        if not text:
            return None
        raw = RawMessage.loads(text)
        try:
            decoded = protocol.decode_task_message(
                raw.headers,
                raw.body.encode("utf-8"),
                raw.properties.get("content_type") or "application/json",
                raw.properties.get("content_encoding") or "utf-8",
            )
            return parse_task(decoded.args[0])
        except (Rejected, IndexError):
            return None

    def _kill_orphans(self) -> None:
        """nmap groups left by a killed predecessor (outside systemd nobody else stops them)."""
        for record in self.work_root.glob("*/phase*/nmap.pid"):
            if runner.kill_orphan(record):
                log.warning("stopped an nmap left running by a previous instance (%s)", record.parent)
        shutil.rmtree(self.work_root, ignore_errors=True)
        self.work_root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ stop

    def _shutdown(self) -> None:
        self.notifier.stopping()
        self.notifier.status("stopping")
        for running in list(self.running.values()):
            running.shutdown = True
            running.cancel.set()
            if running.proc is not None:
                running.proc.cancel()
        self.pool.shutdown(wait=True)
        # Pending cleanups of rejected tasks would each wait for Tasker's keys: not past the stop
        # timeout. Their Tasker keys keep until the lock's TTL; the tasks are failed in Redis already.
        self.janitor.shutdown(wait=True, cancel_futures=True)
        self._collect_events()
        if self.handbacks or self._pending_republish:
            try:
                self._connect_for_handback()
                self._send_handbacks()
            except Exception as exc:
                # The leases stay: the next start of this instance (or another instance once they
                # expire) re-queues these tasks, so nothing is lost.
                log.warning("could not hand tasks back now (%s); they are recovered from Redis later", exc)
            finally:
                self._drop_connection()
        if self.deliverer:
            self.deliverer.stop(timeout=5.0)
        log.info("stopped")

    def _connect_for_handback(self) -> None:
        if self.conn is None:
            self.conn = broker.connect(self.settings)
            self.producer = Producer(self.conn.channel())
            self.broker_ok = True


class _Hooks:
    """Pipeline hooks of one task: Redis status and PID, and the loop's STATUS line."""

    def __init__(self, worker: Worker, running: Running) -> None:
        self.worker = worker
        self.running = running

    def phase(self, phase: Phase, detail: str) -> None:
        self.running.phase, self.running.detail, self.running.percent = phase, detail, None
        set_phase(phase.value)  # the PHASE= journal field of this task's later records
        self._status(TaskState(phase.value))

    def progress(self, phase: Phase, percent: float) -> None:
        self.running.percent = percent
        now = time.monotonic()
        if now - self.running.last_progress_write >= PROGRESS_WRITE_INTERVAL:
            self.running.last_progress_write = now
            self._status(TaskState(phase.value), percent=round(percent, 1))

    def nmap_started(self, phase: Phase, proc: NmapProcess) -> None:
        self.running.proc = proc
        if self.running.cancel.is_set():
            proc.cancel()  # a cancel that raced the start
        self._write(lambda: self.worker.state.set_pid(self.running.task_id, proc.pid))

    def nmap_finished(self, phase: Phase) -> None:
        self.running.proc = None
        self._write(lambda: self.worker.state.clear_pid(self.running.task_id))

    def _status(self, state: TaskState, **extra: Any) -> None:
        phase = self.running.phase.value if self.running.phase else None
        self._write(lambda: self.worker.state.set_status(self.running.task_id, state, phase=phase, **extra))

    def _write(self, write: Callable[[], object]) -> None:
        """A progress or PID write from the runner's wait loop. These are best effort: skipped while
        Redis is known to be down (a call to a dead Redis costs seconds, and the runner must keep
        watching nmap for cancels and timeouts), and the first failure tells the run loop."""
        if not self.worker.redis_ok:
            return
        try:
            write()
        except redis.RedisError as exc:
            self.worker.redis_failed(exc)


def on_delivered(state: RedisState, entry: SpoolEntry, error: str | None) -> None:
    """Deliverer callback: record the upload's outcome on the task's status."""
    try:
        if error is None:
            state.mark_delivered(entry.task_id)
            state.set_status_fields(entry.task_id, delivery="delivered")
        else:
            state.set_status_fields(entry.task_id, delivery=f"refused by ScanLedger: {error}")
    except redis.RedisError as exc:
        log.warning("could not record the delivery of %s: %s", entry.task_id, exc)
