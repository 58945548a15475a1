"""`falcoria-worker status`: one view of every instance on this host, for operators and scripts.

Each running instance keeps a status file in its runtime directory (/run/falcoria-worker/N, which the
unit makes 0750 for the service's group; the file is 0640), rewritten atomically by an observer of the task
lifecycle and of the instance's own life. The command joins those files with what systemd says of each
unit, so it works without root for members of the group. The gathering and rendering are pure; reading
systemd and the files are thin functions at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from falcoria_worker.lifecycle import HANDED_BACK, Event, Outcome, Stage, Transition
from falcoria_worker.spool import Spool

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
RUNTIME_ROOT = Path("/run/falcoria-worker")
UNIT_PATTERN = "falcoria-worker@*.service"
SYSTEMD_PROPERTIES = ("Id", "ActiveState", "SubState", "StatusText", "ActiveEnterTimestamp", "MainPID")


def status_path(state_dir: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """$RUNTIME_DIRECTORY (set by the unit's RuntimeDirectory=) or, run by hand, the state directory."""
    runtime = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return (Path(runtime) if runtime else state_dir) / STATUS_FILE


def spool_counts(spool: Spool | None) -> dict[str, int] | None:
    if spool is None:
        return None

    def count(path: Path) -> int:
        with contextlib.suppress(OSError):
            return sum(1 for child in path.iterdir() if not child.name.startswith("."))
        return 0

    return {"pending": count(spool.pending_dir), "failed": count(spool.failed_dir)}


class StatusFile:
    """Observer and worker observer: the instance's state, its running tasks and its last error, written
    to `path` at every change. Scan threads and the loop both publish, so a lock orders the writes."""

    def __init__(
        self,
        path: Path,
        *,
        instance: str,
        spool: Spool | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.spool = spool
        self.clock = clock
        self._lock = threading.Lock()
        self._write_failed = False
        self._doc: dict[str, Any] = {
            "instance": instance,
            "pid": os.getpid(),
            "state": "starting",
            "started_at": clock(),
            "consuming": False,
            "tasks": {},
            "last_error": None,
        }

    def observe(self, transition: Transition) -> None:
        v = transition.view
        with self._lock:
            tasks = self._doc["tasks"]
            if v.running:
                tasks[v.task_id] = {
                    "target": v.task.ip if v.task else None,
                    "phase": v.phase.value if v.phase else v.stage.value,
                    "percent": round(v.percent, 1) if v.percent is not None else None,
                    "detail": v.detail,
                    "started_at": v.started_at,
                }
            else:
                tasks.pop(v.task_id, None)
            error = _error_of(transition)
            if error:
                self._doc["last_error"] = {"at": transition.at, "task_id": v.task_id, "error": error}
            self._write()

    def worker_started(self) -> None:
        self._set(state="starting")

    def worker_ready(self) -> None:
        self._set(state="ready")

    def consuming_changed(self, consuming: bool) -> None:
        self._set(consuming=consuming)

    def worker_stopping(self) -> None:
        self._set(state="stopping")

    def _set(self, **fields: object) -> None:
        with self._lock:
            self._doc.update(fields)
            self._write()

    def _write(self) -> None:
        doc = {**self._doc, "written_at": self.clock(), "spool": spool_counts(self.spool)}
        try:
            write_atomically(self.path, json.dumps(doc, sort_keys=True).encode())
        except OSError as exc:
            # Only `status` misses it: scans go on. Said once, not at every progress step.
            if not self._write_failed:
                log.warning("cannot write the status file %s: %s", self.path, exc)
            self._write_failed = True
        else:
            self._write_failed = False


def _error_of(t: Transition) -> str | None:
    """What an operator would call an error: a failed task, a scan requeued because of a fault, a report
    ScanLedger refused. A cancel or our own stop is not one."""
    v = t.view
    if t.event is Event.DELIVERY_REFUSED:
        return v.note
    if t.before is Stage.ENDED or t.after is not Stage.ENDED:
        return None
    if v.outcome is Outcome.FAILED or (v.outcome is Outcome.REQUEUED and v.error != HANDED_BACK):
        return v.error
    return None


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one. 0640: the group reads it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.fchmod(fd, 0o640)  # whatever the umask (the unit's is 0077)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the command (pure)


def parse_show(text: str) -> list[dict[str, str]]:
    """`systemctl show` output: KEY=VALUE lines, one blank line between units."""
    units: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                units.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    return units


def instance_of(unit: str) -> str | None:
    name = unit.removesuffix(".service")
    prefix = "falcoria-worker@"
    return name[len(prefix) :] if name.startswith(prefix) and len(name) > len(prefix) else None


def gather(
    units: Iterable[Mapping[str, str]], files: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per instance, systemd's view and the status file's joined on the instance name. A status
    file left by an instance that is no longer active is not shown as current."""
    rows: dict[str, dict[str, Any]] = {}
    for unit in units:
        instance = instance_of(unit.get("Id", ""))
        if instance is None:
            continue
        rows[instance] = {
            "instance": instance,
            "unit": unit.get("Id"),
            "active": unit.get("ActiveState", ""),
            "sub": unit.get("SubState", ""),
            "status_text": unit.get("StatusText", ""),
            "active_since": unit.get("ActiveEnterTimestamp", "") or None,
        }
    for instance, doc in files.items():
        row = rows.setdefault(instance, {"instance": instance, "unit": None, "active": "", "sub": ""})
        if row["unit"] is not None and row["active"] not in ("active", "reloading", "deactivating"):
            continue
        row.update(
            state=doc.get("state"),
            started_at=doc.get("started_at"),
            consuming=doc.get("consuming"),
            tasks=[{"task_id": task_id, **task} for task_id, task in sorted(doc.get("tasks", {}).items())],
            spool=doc.get("spool"),
            last_error=doc.get("last_error"),
        )
    return [rows[k] for k in sorted(rows, key=lambda name: (len(name), name))]


def _uptime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def render(rows: list[dict[str, Any]], now: float) -> str:
    """The human table: one line per instance, then one indented line per running task and last error."""
    if not rows:
        return "no falcoria-worker instances on this host"
    header = ("INSTANCE", "SYSTEMD", "STATE", "UP", "SCANS", "SPOOL", "STATUS")
    lines: list[tuple[str, ...]] = [header]
    extra: dict[int, list[str]] = {}
    for row in rows:
        systemd = "/".join(p for p in (row.get("active"), row.get("sub")) if p) or "-"
        spool = row.get("spool")
        started = row.get("started_at")
        lines.append(
            (
                row["instance"],
                systemd,
                row.get("state") or "-",
                _uptime(now - started) if started else "-",
                str(len(row.get("tasks") or [])),
                f"{spool['pending']} pending, {spool['failed']} failed" if spool else "-",
                row.get("status_text") or "",
            )
        )
        notes = []
        for task in row.get("tasks") or []:
            pct = f" {task['percent']:.0f}%" if task.get("percent") is not None else ""
            notes.append(f"  {task['target']}  {task['phase']}{pct}  task {task['task_id']}")
        error = row.get("last_error")
        if error:
            notes.append(f"  last error ({_uptime(now - error['at'])} ago): {error['error']}")
        extra[len(lines) - 1] = notes
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True)).rstrip())
        out.extend(extra.get(i, []))
    return "\n".join(out)


# ---------------------------------------------------------------------------- the command (edges)


def systemd_units() -> list[dict[str, str]]:
    """Every falcoria-worker@ unit systemd knows, with the properties the table shows; [] without systemd."""
    try:
        names = subprocess.run(
            ["systemctl", "list-units", "--all", "--plain", "--no-legend", "--no-pager", UNIT_PATTERN],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        units = [n for n in names if instance_of(n) is not None]
        if not units:
            return []
        shown = subprocess.run(
            ["systemctl", "show", "--no-pager", f"--property={','.join(SYSTEMD_PROPERTIES)}", *units],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_show(shown)


def status_files(root: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    with contextlib.suppress(OSError):
        for directory in root.iterdir():
            with contextlib.suppress(OSError, ValueError):
                files[directory.name] = json.loads((directory / STATUS_FILE).read_text())
    return files
