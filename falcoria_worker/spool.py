"""Durable on-disk spool of finished reports, and the thread that delivers them to ScanLedger.

Layout under the spool root (names are built from the task id alone, after `_check_task_id`):

    pending/<task_id>/nmap_report.xml    the report, byte for byte what is uploaded
    pending/<task_id>/meta.json          project, mode, track_history, created
    failed/<task_id>/...                 the same plus reason.txt, once ScanLedger refused it for good
    pending/.tmp-<task_id>-<random>      an entry being written
    pending/.done-<task_id>              a delivered entry being removed

Every state change is ONE rename of a directory, fsynced together with the directories involved, so a
crash leaves an entry either wholly pending or wholly not: a half-written entry is only ever seen under a
dot name, which `pending()` ignores and start-up removes.

Delivery is at-least-once and, within one process, exactly once. The one window for a duplicate is a
crash after ScanLedger answered 200 and before `done()`'s rename reached the disk (a read timeout on a
request ScanLedger did process is the other, and no client can close that one). Re-importing the same
report is harmless for every import mode: it writes the same data again and adds no history.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from falcoria_worker.errors import DeliveryRejected, DiskFull, Retryable, disk_full
from falcoria_worker.ledger import LedgerUnavailable, ScanLedger
from falcoria_worker.model import valid_task_id

log = logging.getLogger(__name__)

REPORT = "nmap_report.xml"
META = "meta.json"
REASON = "reason.txt"
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class SpoolEntry:
    task_id: str
    project: str
    mode: str
    track_history: bool
    xml: Path
    created: float


def _check_task_id(task_id: str) -> str:
    if not valid_task_id(task_id):
        raise ValueError(f"unsafe task id for a spool file name: {task_id!r}")
    return task_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_committed(*paths: Path) -> None:
    """fsync after a rename that has already happened. A failure is logged, not raised: the state change
    stands either way, and the worst a lost fsync can do after a crash is bring the entry back, which
    means a second upload, never a lost one."""
    for path in paths:
        try:
            _fsync_dir(path)
        except OSError as exc:
            log.error("spool: fsync of %s failed after a rename: %s", path, exc)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("xb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _copy_synced(src: Path, dest: Path) -> None:
    with src.open("rb") as inp, dest.open("xb") as out:
        shutil.copyfileobj(inp, out, _COPY_CHUNK)
        out.flush()
        os.fsync(out.fileno())


class Spool:
    """The spool directory. Methods are safe to call from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pending_dir = root / "pending"
        self.failed_dir = root / "failed"
        for path in (root, self.pending_dir, self.failed_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)  # reports are sensitive
        self._fail_lock = threading.Lock()
        self._recover()

    def _recover(self) -> None:
        """Removes what a crash left half-done: unfinished puts and delivered entries not yet deleted."""
        for child in self.pending_dir.iterdir():
            if child.name.startswith((".tmp-", ".done-")):
                log.info("spool: removing leftover %s", child.name)
                shutil.rmtree(child)
        _fsync_dir(self.pending_dir)

    def put(self, task_id: str, xml_src: Path, *, project: str, mode: str, track_history: bool) -> SpoolEntry:
        """Copies the report into the spool, durably, before the caller acks or forgets the task.

        Raises FileExistsError if the task is already pending (a redelivered task: check `has()` first).
        """
        name = _check_task_id(task_id)
        final = self.pending_dir / name
        tmp = self.pending_dir / f".tmp-{name}-{secrets.token_hex(4)}"
        created = time.time()
        meta = {
            "task_id": name,
            "project": project,
            "mode": mode,
            "track_history": track_history,
            "created": created,
        }
        try:
            tmp.mkdir(mode=0o700)
            _copy_synced(xml_src, tmp / REPORT)
            _write_synced(tmp / META, json.dumps(meta).encode())
            _fsync_dir(tmp)
            if final.exists():
                raise FileExistsError(f"task {name} is already in the spool")
            # A directory rename never replaces a non-empty directory, so two racing puts cannot both win.
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(f"task {name} is already in the spool") from None
                raise
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if disk_full(exc):
                # Nothing half-written stays behind; the task is handed back and runs again.
                raise DiskFull(self.root) from exc
            raise
        # Unlike the other changes, a put must be durable before the caller acks the task: no quiet fsync.
        _fsync_dir(self.pending_dir)
        return SpoolEntry(name, project, mode, track_history, final / REPORT, created)

    def has(self, task_id: str) -> bool:
        return (self.pending_dir / _check_task_id(task_id)).is_dir()

    def pending(self) -> list[SpoolEntry]:
        """Pending entries, oldest first."""
        entries = []
        for child in self.pending_dir.iterdir():
            if child.name.startswith("."):
                continue
            if not child.is_dir():
                log.warning("spool: ignoring %s: not an entry", child.name)
                continue
            entry = self._load(child)
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.created, e.task_id))

    def counts(self) -> dict[str, int]:
        """Reports waiting for ScanLedger and reports it refused for good, by state."""
        return {
            "pending": sum(1 for c in self.pending_dir.iterdir() if not c.name.startswith(".")),
            "failed": sum(1 for c in self.failed_dir.iterdir() if c.is_dir()),
        }

    def _load(self, path: Path) -> SpoolEntry | None:
        try:
            meta = json.loads((path / META).read_bytes())
            entry = SpoolEntry(
                task_id=_check_task_id(path.name),
                project=str(meta["project"]),
                mode=str(meta["mode"]),
                track_history=bool(meta["track_history"]),
                xml=path / REPORT,
                created=float(meta["created"]),
            )
        except FileNotFoundError:
            if not path.exists():
                return None  # delivered or failed by another thread meanwhile
            problem = "meta.json missing"
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"meta.json unreadable: {exc}"
        else:
            return entry
        # Only a disk fault or a hand edit gets here (entries appear by atomic rename): keep it aside.
        log.error("spool: %s in %s; moving it to failed/", problem, path.name)
        self._move_to_failed(path, problem)
        return None

    def done(self, entry: SpoolEntry) -> None:
        """Forgets an entry ScanLedger accepted. The rename is the commit; the deletion may lag."""
        name = _check_task_id(entry.task_id)
        gone = self.pending_dir / f".done-{name}"
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(self.pending_dir / name, gone)
        _fsync_committed(self.pending_dir)
        shutil.rmtree(gone, ignore_errors=True)

    def fail(self, entry: SpoolEntry, reason: str) -> None:
        """Moves an entry ScanLedger refused for good to failed/, with the reason beside it."""
        self._move_to_failed(self.pending_dir / _check_task_id(entry.task_id), reason)

    def _move_to_failed(self, path: Path, reason: str) -> None:
        reason_file = path / REASON
        reason_file.unlink(missing_ok=True)
        _write_synced(reason_file, reason.encode() + b"\n")
        with self._fail_lock:  # picking a free name and taking it must not interleave
            dest = self.failed_dir / path.name
            n = 1
            while dest.exists():  # the same task failed before: keep both ("+" is never in a task id)
                dest = self.failed_dir / f"{path.name}+{n}"
                n += 1
            os.rename(path, dest)
        _fsync_committed(self.failed_dir, self.pending_dir)


def _fields(entry: SpoolEntry) -> dict[str, str]:
    """Journal fields of a log record about one entry."""
    return {"TASK_ID": entry.task_id}


OnResult = Callable[[SpoolEntry, "str | None"], None]


class Deliverer(threading.Thread):
    """Uploads pending entries oldest first; calls on_result(entry, None) after delivery (the entry is
    already removed then) or on_result(entry, reason) after ScanLedger refused it (moved to failed/).

    Waiting: when ScanLedger is unavailable (connection error, timeout, 429, 502-504) the pass stops and
    the whole spool backs off, capped exponentially with jitter, honouring Retry-After; `wake()` does not
    cut that short, so an outage never turns into a loop. A 500 is ScanLedger's answer to a report its
    parser chokes on, so it backs off that entry alone and the pass goes on: one bad report must not hold
    the others back (which means a later report can overtake it). An entry that failed `give_up_after`
    times, while reports queued after its first failure were accepted, is this report's problem and not
    an outage: it moves to failed/ (kept there for the operator) instead of being retried forever. A
    ScanLedger that answers 500 to everything accepts nothing, so such an outage never fails an entry.
    """

    def __init__(
        self,
        spool: Spool,
        ledger: ScanLedger,
        *,
        on_result: OnResult,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        give_up_after: int = 10,
    ) -> None:
        super().__init__(name="spool-deliverer", daemon=True)
        self._spool = spool
        self._ledger = ledger
        self._on_result = on_result
        self._initial = backoff_initial
        self._max = backoff_max
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._outages = 0  # consecutive passes cut short by an unavailable ScanLedger
        self._give_up_after = give_up_after
        self._accepted = 0  # reports ScanLedger accepted so far (to tell a bad report from an outage)
        # entry -> (failures, monotonic due, self._accepted at its first failure)
        self._retry: dict[tuple[str, float], tuple[int, float, int]] = {}
        self._delivered: set[tuple[str, float]] = set()  # uploaded, removal pending: never upload again

    def wake(self) -> None:
        """A new entry is pending: deliver it now, unless the spool is backing off."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Stops after the upload in flight, if any (its outcome is recorded first). Every spool change
        is a single rename, so even a stop that times out leaves the spool consistent."""
        self._stopping.set()
        self._wake.set()
        if self.ident is None:
            return  # never started
        self.join(timeout)
        if self.is_alive():
            log.warning("spool: delivery still busy with an upload after %.0f s", timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # a wake() during the pass makes the idle wait below return at once
            try:
                wait, wakeable = self._pass()
            except Exception:
                log.exception("spool: delivery pass failed")
                self._outages += 1
                wait, wakeable = self._backoff(self._outages), False
            if wakeable:
                self._wake.wait(wait)
            else:
                self._stopping.wait(wait)

    def _backoff(self, failures: int, retry_after: float | None = None) -> float:
        base = min(self._max, self._initial * 2 ** min(failures - 1, 32))
        delay = base / 2 + random.uniform(0, base / 2)  # noqa: S311 - jitter, not security
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max))
        return delay

    def _pass(self) -> tuple[float | None, bool]:
        """One sweep over the pending entries. Returns (seconds to wait or None for idle, wake-able)."""
        entries = self._spool.pending()
        keys = {(e.task_id, e.created) for e in entries}
        self._retry = {k: v for k, v in self._retry.items() if k in keys}
        self._delivered &= keys
        for entry in entries:
            if self._stopping.is_set():
                break
            key = (entry.task_id, entry.created)
            if key in self._delivered:
                self._finish(entry, key)  # the last removal failed; try again, never upload again
                continue
            if key in self._retry and self._retry[key][1] > time.monotonic():
                continue
            try:
                ips = self._ledger.upload(entry.project, entry.mode, entry.track_history, entry.xml)
            except DeliveryRejected as exc:
                self._reject(entry, key, str(exc))
                continue
            except LedgerUnavailable as exc:
                if exc.status != 500:
                    return self._outage(exc, exc.retry_after, len(entries))
                self._entry_failed(entry, key, exc)
                continue
            except Retryable as exc:
                return self._outage(exc, None, len(entries))
            except Exception as exc:  # e.g. the report unreadable: this entry's problem, not the others'
                self._entry_failed(entry, key, exc)
                continue
            self._outages = 0
            self._accepted += 1
            self._retry.pop(key, None)
            self._delivered.add(key)
            log.info("spool: task %s delivered (%d IPs)", entry.task_id, len(ips), extra=_fields(entry))
            self._finish(entry, key)
        self._outages = 0
        due = [t for _, t, _ in self._retry.values()]
        if self._delivered:  # a removal to retry
            due.append(time.monotonic() + self._backoff(1))
        return (max(0.0, min(due) - time.monotonic()) if due else None), True

    def _outage(self, exc: Exception, retry_after: float | None, pending: int) -> tuple[float, bool]:
        self._outages += 1
        wait = self._backoff(self._outages, retry_after)
        log.warning(
            "spool: ScanLedger unavailable (%s); %d pending, next try in %.1f s",
            exc,
            pending,
            wait,
        )
        return wait, False

    def _entry_failed(self, entry: SpoolEntry, key: tuple[str, float], exc: Exception) -> None:
        failures, _due, accepted_then = self._retry.get(key, (0, 0.0, self._accepted))
        failures += 1
        if failures >= self._give_up_after and self._accepted > accepted_then:
            self._retry.pop(key, None)
            self._reject(
                entry, key, f"not accepted after {failures} attempts while other reports were ({exc})"
            )
            return
        wait = self._backoff(failures)
        self._retry[key] = (failures, time.monotonic() + wait, accepted_then)
        log.warning(
            "spool: task %s not delivered (%s: %s), attempt %d; retry in %.1f s",
            entry.task_id,
            type(exc).__name__,
            exc,
            failures,
            wait,
            extra=_fields(entry),
        )

    def _reject(self, entry: SpoolEntry, key: tuple[str, float], reason: str) -> None:
        try:
            self._spool.fail(entry, reason)
        except OSError as exc:
            # Still pending: the next try gets the same refusal (a refused import changes nothing).
            self._entry_failed(entry, key, exc)
            return
        log.error(
            "spool: task %s refused by ScanLedger: %s",
            entry.task_id,
            reason,
            extra=_fields(entry),
        )
        self._report(entry, reason)

    def _finish(self, entry: SpoolEntry, key: tuple[str, float]) -> None:
        try:
            self._spool.done(entry)
        except OSError:
            log.exception(
                "spool: task %s delivered but not removed; retrying the removal",
                entry.task_id,
                extra=_fields(entry),
            )
            return
        self._delivered.discard(key)
        self._report(entry, None)

    def _report(self, entry: SpoolEntry, reason: str | None) -> None:
        try:
            self._on_result(entry, reason)
        except Exception:
            log.exception("spool: on_result failed for task %s", entry.task_id, extra=_fields(entry))
