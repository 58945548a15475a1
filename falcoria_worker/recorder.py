"""The Redis side of every transition: Tasker's keys, the task's status and the release of its lease.

One observer carries out all three because their order is the contract: Tasker's keys, then the status,
then the lease, released last (once it is gone another instance may take the task). A task's end that
Redis could not take waits in a backlog, replayed in order once Redis answers; progress and PID writes
are best effort, skipped while Redis is known to be down (a call to a dead Redis costs seconds, and the
runner must keep watching nmap for cancels and timeouts).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import redis

from falcoria_worker.errors import describe
from falcoria_worker.lifecycle import Do, Outcome, Stage, Transition, status_value
from falcoria_worker.logs import task_context
from falcoria_worker.redis_store import RedisStore

log = logging.getLogger(__name__)

LATE_CLEANUP = 60.0  # seconds after which a refused task whose tracking came late is cleaned again
LATER_MAX = 10_000  # late cleanups kept at most (a flood of forged messages must not exhaust memory)
_SCANNING = frozenset({Stage.PORTS_SCAN, Stage.SERVICE_SCAN})
# From these stages on our lease holds the task until its end is recorded: its status is written only
# while it still does (see RedisStore.set_status).
_LEASED = frozenset({Stage.LEASED, Stage.RECEIVED, *_SCANNING, Stage.SCANNED})


class RedisHealth:
    """Whether Redis answered last. Written by any thread that finds it gone and by the loop that finds
    it back; a stale read costs one skipped or one failed write, so a plain bool is enough."""

    def __init__(self) -> None:
        self.ok = False

    def failed(self, exc: BaseException) -> None:
        """The loop stops taking work at its next tick and STATUS tells the truth from then on."""
        if self.ok:
            self.ok = False
            log.warning("Redis unavailable: %s; not taking new scans", describe(exc))


class RedisRecorder:
    def __init__(self, store: RedisStore, health: RedisHealth, *, nodename: str, owner: str) -> None:
        self.store = store
        self.health = health
        self.nodename = nodename
        self.owner = owner
        # Finishing refused tasks waits for Tasker's tracking keys; that must hold neither the loop nor a
        # scan slot.
        self.janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="janitor")
        # Shared by the scan threads (appending) and the loop (replaying).
        self._backlog: list[Transition] = []
        self._backlog_lock = threading.Lock()
        # Shared by the janitor (pushing) and the loop (running them).
        self._later: list[tuple[float, int, Callable[[], None]]] = []
        self._later_seq = itertools.count()
        self._later_lock = threading.Lock()

    def observe(self, t: Transition) -> None:
        v = t.view
        if t.has(Do.AWAIT_TRACKING):
            self.janitor.submit(self._finish_refused, t)
        elif t.has(Do.CLEAN_KEYS) and v.task is None:
            self._terminal(t, [Do.WRITE_STATUS])
            payload = v.delivery.payload if v.delivery is not None else None
            self.janitor.submit(self._clean_refused, v.task_id, payload)
        elif t.before is Stage.ENDED:
            try:  # the deliverer's report on a stored task
                self._carry_out(t, t.actions)
            except redis.RedisError as exc:
                log.warning("could not record the delivery of %s: %s", t.task_id, exc)
        elif t.after is Stage.ENDED:
            self._terminal(t, None)
        elif self.health.ok:
            try:
                self._carry_out(t, t.actions)
            except redis.RedisError as exc:
                self.health.failed(exc)

    def _terminal(self, t: Transition, only: list[Do] | None) -> None:
        try:
            self._carry_out(t, t.actions, only)
        except redis.RedisError as exc:
            log.warning("Redis unavailable at the end of the task (%s); cleanup deferred", describe(exc))
            self.health.failed(exc)
            with self._backlog_lock:
                self._backlog.append(t)

    def _carry_out(self, t: Transition, actions: tuple, only: list[Do] | None = None) -> None:
        v, s, task_id = t.view, self.store, t.task_id
        for action in actions:
            do = action.do
            if only is not None and do not in only:
                continue
            if do is Do.MARK_RUNNING and v.task is not None:
                s.mark_running(task_id, v.task, started_at=int(v.started_at or t.at))
            elif do is Do.WRITE_PID and v.pid is not None:
                s.set_pid(task_id, v.pid)
            elif do is Do.CLEAR_PID:
                s.clear_pid(task_id)
            elif do is Do.CLEAN_KEYS and v.task is not None:
                s.cleanup(task_id, v.task, include_lock=not t.has(Do.KEEP_LOCK))
            elif do is Do.CLEAR_TRACES:
                s.clear_running(task_id)
            elif do is Do.WRITE_STATUS:
                self._write_status(t)
            elif do is Do.WRITE_DELIVERY and t.before is not Stage.ENDED:
                # Written before the deliverer is woken, so a fast "delivered" is never overwritten;
                # best effort: the deliverer's own report follows anyway.
                with contextlib.suppress(redis.RedisError):
                    s.set_status_fields(task_id, delivery=v.note)
            elif do is Do.WRITE_DELIVERY:
                s.set_status_fields(task_id, delivery=v.note)
            elif do is Do.MARK_DELIVERED:
                s.mark_delivered(task_id)
            elif do is Do.RELEASE_LEASE:
                s.release(task_id, self.owner)

    def _write_status(self, t: Transition) -> None:
        v = t.view
        extra: dict[str, object] = {}
        if t.has(Do.RELEASE_LEASE) or t.has(Do.MARK_RUNNING):
            extra["worker"] = self.nodename
        if v.outcome is Outcome.COMPLETED and v.note and v.note != "pending":
            extra["delivery"] = v.note
        phase = v.phase.value if v.stage in _SCANNING and v.phase is not None else None
        percent = round(v.percent, 1) if phase and v.percent is not None else None
        held_by = self.owner if t.before in _LEASED else None
        self.store.set_status(
            t.task_id, status_value(v), phase=phase, percent=percent, error=v.error, held_by=held_by, **extra
        )

    # ------------------------------------------------------------------ the loop's duties

    def flush(self) -> None:
        """Replay the ends Redis missed, oldest first. Raises RedisError when it is still gone."""
        with self._backlog_lock:
            backlog, self._backlog = self._backlog, []
        for i, t in enumerate(backlog):
            try:
                self._carry_out(t, t.actions)
            except redis.RedisError:
                with self._backlog_lock:
                    self._backlog[:0] = backlog[i:]
                raise

    @property
    def caught_up(self) -> bool:
        with self._backlog_lock:
            return not self._backlog

    def next_cleanup(self) -> float | None:
        """When the first late cleanup is due (monotonic), if any is queued."""
        with self._later_lock:
            return self._later[0][0] if self._later else None

    def run_late_cleanups(self, now: float) -> None:
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

    def close(self) -> None:
        # Pending cleanups of refused tasks would each wait for Tasker's keys: not past the stop
        # timeout. Their Tasker keys keep until the lock's TTL; the tasks are failed in Redis already.
        self.janitor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ refused tasks (janitor)

    def _clean_again_later(self, clean: Callable[[], None]) -> None:
        """Tasker tracks a big batch's tasks only after publishing all of them, which can take longer
        than the grace: a task refused meanwhile is cleaned once more when that has surely happened,
        or Tasker's SADDs land after our SREMs and it counts the task forever. The loop runs these
        (a heap, not a thread each: a flood of forged messages must not become a flood of threads)."""
        with self._later_lock:
            if len(self._later) >= LATER_MAX:
                log.warning("too many late cleanups queued; dropping the oldest")
                heapq.heappop(self._later)
            heapq.heappush(self._later, (time.monotonic() + LATE_CLEANUP, next(self._later_seq), clean))

    def _clean_refused(self, task_id: str, payload: object) -> None:
        with task_context(task_id=task_id):
            try:
                # No waiting here: a payload we cannot parse gives no lock to tell a late Tasker from a
                # forger who never writes metadata, and waiting held up every other refusal.
                if not self.store.metadata_exists(task_id):
                    self._clean_again_later(lambda: self.store.cleanup_partial(task_id, payload))
                self.store.cleanup_partial(task_id, payload)
            except redis.RedisError as exc:
                log.warning("cleanup of a rejected task failed: %s", exc)
            except Exception:
                log.exception("cleanup of a rejected task failed")

    def _finish_refused(self, t: Transition) -> None:
        task = t.view.task
        project, target = (task.project, task.ip) if task else (None, None)
        with task_context(task_id=t.task_id, project_id=project, target=target):
            try:
                if not self.store.await_tracking(t.task_id, task) and task is not None:
                    # The first cleanup removes the lock; a rescan may hold a new one a minute later.
                    self._clean_again_later(lambda: self.store.cleanup(t.task_id, task, include_lock=False))
                self._carry_out(t, t.actions)
            except redis.RedisError as exc:
                log.warning("cleanup of a rejected task failed: %s", exc)
            except Exception:
                log.exception("cleanup of a rejected task failed")
