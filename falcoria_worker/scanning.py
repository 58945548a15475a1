"""The scan threads: each drives the Engine for one admitted task and reports what happened to the
task's record as lifecycle events; the report is made durable here, before the lease is released."""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from falcoria_worker import runner
from falcoria_worker.config import Settings
from falcoria_worker.delivery import Deliverer
from falcoria_worker.errors import Cancelled, Rejected, ScanFailed, ScanInterrupted, describe
from falcoria_worker.lifecycle import Do, Event
from falcoria_worker.logs import task_context
from falcoria_worker.model import Phase, ScanTask
from falcoria_worker.pipeline import Engine, Plan
from falcoria_worker.recorder import RedisHealth
from falcoria_worker.redis_store import RedisStore
from falcoria_worker.runner import NmapProcess
from falcoria_worker.spool import Spool
from falcoria_worker.tasks import TaskRecord

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 1.0


def logged(fn: Callable[..., None]) -> Callable[..., None]:
    """Pool work whose exceptions are logged: an executor keeps them in a future nobody reads."""

    @functools.wraps(fn)
    def run(*args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("%s failed", fn.__name__)

    return run


class Scans:
    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine,
        store: RedisStore,
        health: RedisHealth,
        spool: Spool | None,
        deliverer: Deliverer | None,
        ended: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.health = health
        self.spool = spool
        self.deliverer = deliverer
        state_dir = Path(settings.state_dir)
        self.results_dir = state_dir / "results"
        self.work_root = state_dir / "work"
        self.pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="scan")
        # Ids of the tasks whose thread has ended: put by the scan threads, which then wake the loop.
        self._ended: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake_loop = ended

    def start(self, record: TaskRecord, plan: Plan) -> None:
        self.pool.submit(logged(self._run), record, plan)

    def take_ended(self) -> list[str]:
        """The ids of the tasks whose thread ended since the last call (the loop's)."""
        ids = []
        with contextlib.suppress(queue.Empty):
            while True:
                ids.append(self._ended.get_nowait())
        return ids

    def stop(self) -> None:
        self.pool.shutdown(wait=True)

    def kill_orphans(self) -> None:
        """nmap groups left by a killed predecessor (outside systemd nobody else stops them)."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        for record in self.work_root.glob("*/phase*/nmap.pid"):
            if runner.kill_orphan(record):
                log.warning("stopped an nmap left running by a previous instance (%s)", record.parent)
        shutil.rmtree(self.work_root, ignore_errors=True)
        self.work_root.mkdir(parents=True, exist_ok=True)

    def _run(self, record: TaskRecord, plan: Plan) -> None:
        task, task_id = plan.task, record.task_id
        with task_context(task_id=task_id, project_id=task.project, target=task.ip):
            try:
                self._scan(record, plan)
            finally:
                self._ended.put(task_id)
                self._wake_loop()

    def _scan(self, record: TaskRecord, plan: Plan) -> None:
        task, task_id = plan.task, record.task_id
        workdir = self.work_root / task_id
        keep_lock = False
        try:
            self.store.await_tracking(task_id, task)
            if self.settings.require_task_metadata and self.store.tasker_stopped(task_id, task):
                keep_lock = True  # Tasker's stop removed it; a rescan may own that lock now
                raise Cancelled("stopped by Tasker: its metadata and lock are gone")
            outcome = self.engine.execute(plan, workdir, record.cancel, _Hooks(record))
            notes = "; ".join(outcome.notes) or None
            scanned = record.apply(Event.SCANNED, open_ports=len(outcome.open_ports), error=notes)
            if not scanned.has(Do.SPOOL_REPORT):
                log.info("another worker took the task over")  # it delivers, not us
                return
            note, wake = self._store(task_id, task, outcome.report)
            record.apply(Event.STORED, note=note)
            if wake and self.deliverer:
                self.deliverer.wake()
            log.info(
                "scan finished: %d open port(s)%s", len(outcome.open_ports), f" ({notes})" if notes else ""
            )
        except ScanInterrupted as exc:
            log.warning("%s; re-queueing the task", exc)
            record.apply(Event.NMAP_KILLED, error=str(exc))
        except redis.RedisError as exc:
            # Not the task's fault either: run it again once Redis is back (through the lease).
            self.health.failed(exc)
            record.apply(Event.REDIS_LOST, error=f"Redis unavailable: {describe(exc)}")
        except Cancelled as exc:
            keep_lock = keep_lock or not self._lock_is_ours(task_id)
            log.info("%s", "stopped by shutdown; handing the task back" if record.view.stopping else exc)
            record.apply(Event.CANCELLED, error=str(exc), keep_lock=keep_lock)
        except (Rejected, ScanFailed) as exc:
            error = exc.reason if isinstance(exc, Rejected) else str(exc)
            log.error("scan failed: %s", error)
            record.apply(Event.FAILED, error=error)
        except Exception as exc:  # a bug must fail one task, not the worker
            log.exception("scan failed with an internal error")
            record.apply(Event.FAILED, error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _lock_is_ours(self, task_id: str) -> bool:
        """Tasker's stop deletes a task's metadata and lock together before it broadcasts the cancel.
        Metadata still there means no stop ran (a bare cancel): the lock is this task's to delete.
        Metadata gone means the lock is gone too, or belongs to a rescan queued since: keep it."""
        try:
            return self.store.metadata_exists(task_id)
        except redis.RedisError:
            return False  # in doubt, leave the lock to its TTL

    def _store(self, task_id: str, task: ScanTask, report: Path | None) -> tuple[str | None, bool]:
        """Make the result durable before the lease is released (exactly-once hinges on this order).
        Returns the status's delivery text (None: the deliverer reports it) and whether to wake it."""
        if report is None:
            return "nothing to import", False
        if self.spool is not None:
            if self.spool.has(task_id):
                # A re-run of a task whose result is already waiting (the lease outlived a crash
                # right after the spool write): deliver that one, never two.
                log.warning("a result for this task is already spooled; keeping it")
                return None, False
            self.spool.put(
                task_id, report, project=task.project, mode=task.mode.value, track_history=task.track_history
            )
            return "pending", True
        self.results_dir.mkdir(parents=True, exist_ok=True)
        target = self.results_dir / f"{task_id}.xml"
        shutil.move(str(report), target)
        return f"stored in {target}", False

    def stored(self, task_id: str) -> bool:
        """Whether a result of the task is on disk (spooled, or in the results dir)."""
        spooled = self.spool is not None and self.spool.has(task_id)
        return spooled or (self.results_dir / f"{task_id}.xml").exists()


class _Hooks:
    """The Engine's hooks of one task, turned into events of its record."""

    def __init__(self, record: TaskRecord) -> None:
        self.record = record
        self._last_progress = 0.0

    def phase(self, phase: Phase, detail: str) -> None:
        self.record.apply(Event.PHASE_STARTED, phase=phase, detail=detail)

    def progress(self, phase: Phase, percent: float) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_WRITE_INTERVAL:
            self._last_progress = now
            self.record.apply(Event.PROGRESS, percent=percent)

    def nmap_started(self, phase: Phase, proc: NmapProcess) -> None:
        self.record.attach(proc)
        self.record.apply(Event.NMAP_STARTED, pid=proc.pid)

    def nmap_finished(self, phase: Phase) -> None:
        self.record.attach(None)
        self.record.apply(Event.PHASE_DONE)
