"""Prometheus metrics through node_exporter's textfile collector: an observer of the task lifecycle.

The bare-metal convention: no port of our own and nothing to authenticate. Each instance writes
`<METRICS_TEXTFILE_DIR>/falcoria-worker@<N>.prom` with prometheus_client's `write_to_textfile` (a
temporary file renamed over the old one, so node_exporter never reads half a file) SETTLE seconds after
a change and at least every WRITE_INTERVAL seconds, and removes it on a clean stop.

A transition only updates the registry and marks it changed; the loop writes the file at its first turn
SETTLE seconds after the first change not yet written (`next_due()` wakes it then). A write is a
millisecond of CPU and file-system work: done at once it would sit on a task's critical path several
times (lease claimed, nmap started, phases, upload) and compete with the scan thread starting nmap; a
second later it lands while nmap runs, and a burst of transitions (a task's start, progress of several
scans) is written once. node_exporter reads the file every 15 s, so a second of settling costs nothing.

The unit's UMask=0077 would make the file unreadable to node_exporter's user, so the temporary file is
created 0644 first and write_to_textfile reuses it; a later prometheus_client that names its temporary
file differently only costs a chmod after the rename.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, write_to_textfile

from falcoria_worker.lifecycle import Event, Transition

log = logging.getLogger(__name__)

DEBIAN_TEXTFILE_DIR = Path("/var/lib/prometheus/node-exporter")
WRITE_INTERVAL = 15.0  # seconds; node_exporter scrapes every 15 s by default
SETTLE = 1.0  # seconds a change waits for the transitions around it before the file is written
FILE_MODE = 0o644
# Scans take seconds to hours.
PHASE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
# A refusal's label is the field it names ("rejected: open_ports_opts: ..."), bounded to keep series few.
_PHASE_STAGES = frozenset({"ports_scan", "service_scan"})
_REASON = re.compile(r"rejected: ([a-z_.]{1,40})")
_UPLOADS = {Event.DELIVERED: "delivered", Event.DELIVERY_REFUSED: "refused"}


def textfile_dir(setting: str) -> Path | None:
    """Where the metrics go: "" is off, "auto" is Debian's node-exporter directory when it exists."""
    if not setting:
        return None
    if setting == "auto":
        return DEBIAN_TEXTFILE_DIR if DEBIAN_TEXTFILE_DIR.is_dir() else None
    return Path(setting)


def rejection_reason(error: str | None) -> str:
    match = _REASON.match(error or "")
    return match.group(1) if match else "other"


class Metrics:
    """Observer (`lifecycle.Observer` and `WorkerObserver`) owning one CollectorRegistry.

    Uploads are the deliverer's transitions of a stored report, lease recoveries the LEASE_EXPIRED ones;
    what is no task's comes from `spool_counts` (read at each write) and `raw_socket_capable()`. The loop
    calls `tick()` every turn, and `remove()` follows a clean stop."""

    def __init__(
        self,
        directory: Path,
        instance: str,
        version: str,
        *,
        spool_counts: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self.path = directory / f"falcoria-worker@{instance}.prom"
        self.spool_counts = spool_counts
        self.registry = CollectorRegistry()
        r = self.registry
        self.tasks = Counter("falcoria_worker_tasks", "Tasks ended, by outcome", ["outcome"], registry=r)
        self.phase_seconds = Histogram(
            "falcoria_worker_phase_seconds",
            "Time a scan spent in each nmap phase",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.open_ports = Counter("falcoria_worker_open_ports", "Open ports found by scans", registry=r)
        self.running = Gauge("falcoria_worker_running_tasks", "Scans running now", registry=r)
        self.spool = Gauge(
            "falcoria_worker_spool_reports", "Reports in the spool, by state", ["state"], registry=r
        )
        self.uploads = Counter(
            "falcoria_worker_uploads", "Report uploads to ScanLedger, by result", ["result"], registry=r
        )
        self.lease_recoveries = Counter(
            "falcoria_worker_lease_recoveries", "Tasks re-published from an expired lease", registry=r
        )
        self.rejected = Counter(
            "falcoria_worker_rejected_tasks", "Tasks refused, by the field refused", ["reason"], registry=r
        )
        self.raw_socket = Gauge(
            "falcoria_worker_raw_socket_capable", "1 if nmap may open raw sockets", registry=r
        )
        self.draining = Gauge(
            "falcoria_worker_draining", "1 while the instance takes no new scans", registry=r
        )
        self.consuming = Gauge(
            "falcoria_worker_consuming", "1 while the instance consumes the scan queue", registry=r
        )
        Info("falcoria_worker_build", "The running falcoria-worker", registry=r).info({"version": version})
        self._lock = threading.Lock()
        self._running: dict[str, tuple[str | None, float]] = {}  # task id -> (phase, since)
        self._last_write = 0.0
        self._changed = False
        self._due = 0.0  # when the changes not yet written are written (monotonic)
        self._failed_once = False

    # ------------------------------------------------------------------ tasks

    def observe(self, transition: Transition) -> None:
        view = transition.view
        if transition.event in _UPLOADS:
            self.uploads.labels(result=_UPLOADS[transition.event]).inc()
        elif transition.event is Event.LEASE_EXPIRED:
            self.lease_recoveries.inc()
        ended = transition.after == "ended" and transition.before != "ended"
        with self._lock:
            # A phase lasts while the task is in its stage: SCANNED keeps the last phase but nmap is done.
            phase = str(view.stage) if view.stage in _PHASE_STAGES else None
            known = self._running.get(transition.task_id)
            if known is not None and (known[0] != phase or ended):
                self._phase_done(known, transition.at)
            if ended:
                self._running.pop(transition.task_id, None)
                self._count_end(transition)
            elif view.running and (known is None or known[0] != phase):
                self._running[transition.task_id] = (phase, transition.at)
            self.running.set(len(self._running))
        self._mark_changed()

    def _phase_done(self, known: tuple[str | None, float], at: float) -> None:
        phase, since = known
        if phase is not None:
            self.phase_seconds.labels(phase=phase).observe(max(at - since, 0.0))

    def _count_end(self, transition: Transition) -> None:
        view = transition.view
        outcome = str(view.outcome) if view.outcome is not None else "unknown"
        self.tasks.labels(outcome=outcome).inc()
        if view.open_ports:
            self.open_ports.inc(view.open_ports)
        if outcome == "failed" and (view.error or "").startswith("rejected: "):
            self.rejected.labels(reason=rejection_reason(view.error)).inc()

    # ------------------------------------------------------------------ the instance

    def worker_started(self) -> None:
        self.write()

    def worker_ready(self) -> None:
        self.write()

    def consuming_changed(self, consuming: bool) -> None:
        self.consuming.set(1 if consuming else 0)
        self._mark_changed()

    def worker_stopping(self) -> None:
        """The file stays until `remove()`: a stop that hands scans back is still worth a last write."""
        self.write()

    def draining_changed(self, draining: bool) -> None:
        self.draining.set(1 if draining else 0)
        self._mark_changed()

    def raw_socket_capable(self, capable: bool) -> None:
        self.raw_socket.set(1 if capable else 0)
        self._mark_changed()

    # ------------------------------------------------------------------ the file

    def _mark_changed(self) -> None:
        # Any thread; the first change after a write sets when it is written. A race between two
        # threads here moves that by less than SETTLE, and both changes are in the registry already.
        if not self._changed:
            self._due = time.monotonic() + SETTLE
            self._changed = True

    def next_due(self) -> float:
        """When the loop must turn next for this file (monotonic)."""
        return self._due if self._changed else self._last_write + WRITE_INTERVAL

    def tick(self, now: float | None = None) -> None:
        """Writes the changes once they settled, and the file at least every WRITE_INTERVAL seconds."""
        now = time.monotonic() if now is None else now
        if now >= self.next_due():
            self.write(now)

    def write(self, now: float | None = None) -> None:
        """Writes the file; a failure is logged once per run of failures and never raised: metrics
        must not stop a scan."""
        self._last_write = time.monotonic() if now is None else now
        self._changed = False
        path = str(self.path)
        if self.spool_counts is not None:
            try:
                for state, count in self.spool_counts().items():
                    self.spool.labels(state=state).set(count)
            except OSError as exc:
                log.debug("could not count the spool: %s", exc)
        # write_to_textfile's temporary file: created here 0644 so the unit's UMask does not apply.
        tmp = f"{path}.{os.getpid()}.{threading.current_thread().ident}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            os.fchmod(fd, FILE_MODE)
            os.close(fd)
            write_to_textfile(path, self.registry)
            if os.stat(path).st_mode & 0o777 != FILE_MODE:
                os.chmod(path, FILE_MODE)
        except OSError as exc:
            if not self._failed_once:
                log.warning("could not write the metrics file %s: %s", path, exc)
            self._failed_once = True
            return
        self._failed_once = False

    def remove(self) -> None:
        """A clean stop: node_exporter stops exporting this instance's metrics."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the metrics file %s: %s", self.path, exc)
