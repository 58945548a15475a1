"""Durable on-disk spool of finished reports (delivery.py uploads them to ScanLedger).

Layout under the spool root (names are built from the task id alone, after `_check_task_id`):

    pending/<task_id>/nmap_report.xml    the report, byte for byte what is uploaded
    pending/<task_id>/meta.json          project, mode, track_history, created
    failed/<task_id>/...                 the same plus reason.txt, once ScanLedger refused it for good
    pending/.tmp-<task_id>-<random>      an entry being written
    pending/.done-<task_id>              a delivered entry being removed
    <pending|failed>/.drop-<name>-<rnd>  an entry the operator dropped, being removed

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
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from falcoria_worker.errors import DiskFull, disk_full
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


class SpoolRefused(Exception):
    """An operator's spool change that was not made, because it would lose or hide a report."""


@dataclass(frozen=True)
class Held:
    """An entry as `falcoria-worker spool` shows it. `name` is its directory name: the task id, or for
    a task that failed more than once, the task id and "+N". `entry` is None when meta.json is
    unreadable (`problem` says why)."""

    state: str  # "pending" or "failed"
    name: str
    entry: SpoolEntry | None
    problem: str | None
    reason: str | None
    size: int


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

    def __init__(self, root: Path, *, owner: bool = True) -> None:
        """`owner` is the worker that delivers from this spool: it creates the directories and removes
        what a crash of its predecessor left half-done. The operator's command line is not the owner: a
        worker may be writing an entry under a dot name right now."""
        self.root = root
        self.pending_dir = root / "pending"
        self.failed_dir = root / "failed"
        self._fail_lock = threading.Lock()
        if not owner:
            if not self.pending_dir.is_dir():
                raise FileNotFoundError(f"no spool at {root} (wrong --instance or STATE_DIR?)")
            return
        for path in (root, self.pending_dir, self.failed_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)  # reports are sensitive
        self._recover()

    def _recover(self) -> None:
        """Removes what a crash left half-done: unfinished puts, delivered and dropped entries."""
        for folder in (self.pending_dir, self.failed_dir):
            for child in folder.iterdir():
                if child.name.startswith((".tmp-", ".done-", ".drop-")):
                    log.info("spool: removing leftover %s", child.name)
                    shutil.rmtree(child)
            _fsync_dir(folder)

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
            entry = _read_entry(path)
        except FileNotFoundError:
            if not path.exists():
                return None  # delivered or failed by another thread meanwhile
            problem = "meta.json missing"
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
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

    # --- what the operator does with `falcoria-worker spool` ---------------------------------------

    def held(self) -> list[Held]:
        """Every pending and failed entry, oldest first within each; reads only, moves nothing."""
        out = []
        for state, folder in (("pending", self.pending_dir), ("failed", self.failed_dir)):
            items = []
            for child in folder.iterdir() if folder.is_dir() else ():
                if child.name.startswith(".") or not child.is_dir():
                    continue
                items.append(_held(state, child))
            items.sort(key=lambda h: (h.entry.created if h.entry else 0.0, h.name))
            out += items
        return out

    def find(self, name: str) -> Held:
        """The entry called `name`; SpoolRefused if there is none. A task can be pending and have
        failed before under the same name: the failed entry is the one an operator acts on."""
        for state, folder in (("failed", self.failed_dir), ("pending", self.pending_dir)):
            path = folder / name
            if _entry_name(name) and path.is_dir():
                return _held(state, path)
        raise SpoolRefused(f"no spool entry {name!r} (see `falcoria-worker spool list`)")

    def requeue(self, name: str) -> SpoolEntry:
        """Moves a failed entry back to pending, under its task id, for the deliverer's next pass.

        Refused when the move would lose or bury a report: the task is pending already (a newer
        report of the same task, which this one would have to replace), or the entry could not be
        uploaded as it is (meta.json or the report missing), which would only fail it again."""
        held = self.find(name)
        if held.state != "failed":
            raise SpoolRefused(f"{name} is pending already: the worker delivers it")
        if held.entry is None:
            raise SpoolRefused(f"{name} cannot be retried: {held.problem}; `spool show` it, then drop it")
        if not held.entry.xml.is_file():
            raise SpoolRefused(f"{name} cannot be retried: its {REPORT} is missing")
        task_id = held.entry.task_id
        source = self.failed_dir / name
        if (self.pending_dir / task_id).exists():
            raise SpoolRefused(
                f"{name} cannot be retried: task {task_id} is pending with another report, which a "
                "retry would have to replace; wait for it to be delivered, or drop one of the two"
            )
        (source / REASON).unlink(missing_ok=True)  # the reason of the last refusal, not part of the report
        try:
            os.rename(source, self.pending_dir / task_id)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise SpoolRefused(
                    f"{name} cannot be retried: task {task_id} became pending meanwhile"
                ) from None
            raise
        _fsync_committed(self.pending_dir, self.failed_dir)
        return held.entry

    def drop(self, name: str, *, pending: bool = False) -> Held:
        """Deletes an entry for good. A pending entry is a report not yet delivered: only with `pending`."""
        held = self.find(name)
        if held.state == "pending" and not pending:
            raise SpoolRefused(
                f"{name} is pending, not failed: it is a report ScanLedger has not seen yet; "
                "give --pending to drop it anyway"
            )
        folder = self.pending_dir if held.state == "pending" else self.failed_dir
        gone = folder / f".drop-{name}-{secrets.token_hex(4)}"
        os.rename(folder / name, gone)  # the commit: a dot name is never delivered nor listed
        _fsync_committed(folder)
        shutil.rmtree(gone, ignore_errors=True)
        return held


def _entry_name(name: str) -> bool:
    task_id, plus, n = name.partition("+")
    return valid_task_id(task_id) and (not plus or n.isdigit())


def _read_entry(path: Path) -> SpoolEntry:
    """The entry in directory `path` (pending or failed); raises when meta.json is missing or bad."""
    meta = json.loads((path / META).read_bytes())
    task_id = str(meta.get("task_id", path.name.partition("+")[0]))
    if task_id != path.name.partition("+")[0]:
        raise ValueError(f"it names task {task_id!r}, the directory another")
    return SpoolEntry(
        task_id=_check_task_id(task_id),
        project=str(meta["project"]),
        mode=str(meta["mode"]),
        track_history=bool(meta["track_history"]),
        xml=path / REPORT,
        created=float(meta["created"]),
    )


def _held(state: str, path: Path) -> Held:
    entry: SpoolEntry | None = None
    problem = reason = None
    try:
        entry = _read_entry(path)
    except FileNotFoundError:
        problem = f"{META} missing"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"{META} unreadable: {exc}"
    if (path / REASON).is_file():
        reason = (path / REASON).read_text(errors="replace").strip() or None
    size = (path / REPORT).stat().st_size if (path / REPORT).is_file() else 0
    return Held(state, path.name, entry, problem, reason, size)
