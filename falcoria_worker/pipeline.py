"""The two-phase scan of one task: validate, open ports, service detection, merge.

Everything that decides is here; everything that touches the world is injected (`run` is
`runner.run_nmap` in production), so the same sequence serves `falcoria-worker scan`, the queue
worker and the unit tests. Delivery is not part of it: the caller spools the merged report.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from falcoria_worker import argv, merge
from falcoria_worker.caps import RawSockets, needs_privileged_flag
from falcoria_worker.errors import (
    Cancelled,
    DiskFull,
    Rejected,
    ScanFailed,
    ScanInterrupted,
    disk_full,
)
from falcoria_worker.model import Phase, PortRef, ScanTask
from falcoria_worker.policy import PolicyConfig, ScanOptions, check_options
from falcoria_worker.runner import NmapProcess, NmapRun, run_nmap
from falcoria_worker.scope import Scope


class Hooks(Protocol):
    """What the caller learns while a task runs (Redis status, sd_notify STATUS, a terminal)."""

    def phase(self, phase: Phase, detail: str) -> None: ...
    def progress(self, phase: Phase, percent: float) -> None: ...
    def nmap_started(self, phase: Phase, proc: NmapProcess) -> None: ...
    def nmap_finished(self, phase: Phase) -> None: ...


class NoHooks:
    def phase(self, phase: Phase, detail: str) -> None:
        pass

    def progress(self, phase: Phase, percent: float) -> None:
        pass

    def nmap_started(self, phase: Phase, proc: NmapProcess) -> None:
        pass

    def nmap_finished(self, phase: Phase) -> None:
        pass


@dataclass(frozen=True)
class Plan:
    """A task whose options and target passed every check: safe to hand to nmap."""

    task: ScanTask
    ports_opts: ScanOptions
    service_opts: ScanOptions


@dataclass(frozen=True)
class Outcome:
    report: Path | None  # merged XML; None when nmap saw no host (nothing ScanLedger could import)
    open_ports: tuple[PortRef, ...]
    notes: tuple[str, ...] = ()  # e.g. service detection timed out: delivered without it
    durations: dict[str, float] = field(default_factory=dict)


RunNmap = Callable[..., NmapRun]


@dataclass(frozen=True)
class Engine:
    nmap: str
    policy: PolicyConfig
    scope: Scope
    raw: RawSockets
    stats_every: str = "2s"
    kill_grace: float = 2.0
    source: argv.Source | None = None
    run: RunNmap = run_nmap

    def prepare(self, task: ScanTask) -> Plan:
        """Check everything before any process starts: a bad phase-2 option must not cost a phase 1."""
        ports_opts = check_options(task.open_ports_opts, Phase.PORTS, self.policy)
        service_opts = check_options(task.service_opts, Phase.SERVICES, self.policy)
        self.scope.check(task.ip)
        if self.source is not None and self.source.version != task.ip_version:
            raise Rejected(
                f"target {task.ip} refused: this instance scans from the IPv{self.source.version} address "
                f"{self.source.address} (SOURCE_ADDRESS) and cannot reach an IPv{task.ip_version} target",
                field="ip",
            )
        if task.ip_version == 4 and (ports_opts.ipv6 or service_opts.ipv6):
            raise Rejected(f"option '-6' given for the IPv4 target {task.ip}", field="open_ports_opts")
        raw_needed = ports_opts.needs_raw or (task.include_services and service_opts.needs_raw)
        if raw_needed and self.raw is RawSockets.NONE:
            # nmap would quit ("requires root privileges") or silently fall back to a connect scan.
            raise ScanFailed(
                "these options need raw sockets, and this worker has neither root nor CAP_NET_RAW "
                "(run it under the falcoria-worker@ unit, which grants CAP_NET_RAW)"
            )
        return Plan(task, ports_opts, service_opts)

    @property
    def privileged(self) -> bool:
        return needs_privileged_flag(self.raw)

    def execute(
        self, plan: Plan, workdir: Path, cancel: threading.Event, hooks: Hooks | None = None
    ) -> Outcome:
        """Raises DiskFull when the work directory's filesystem fills up: whatever failed then (nmap
        writing its XML, the merge, a truncated file read back) failed for want of space, not because
        of the task."""
        try:
            return self._execute(plan, workdir, cancel, hooks or NoHooks())
        except (OSError, ScanFailed) as exc:
            if disk_full(exc) or _no_room(workdir.parent):
                raise DiskFull(workdir.parent) from exc
            raise

    def _execute(self, plan: Plan, workdir: Path, cancel: threading.Event, hooks: Hooks) -> Outcome:
        task = plan.task
        if workdir.exists():
            shutil.rmtree(workdir)  # a rerun after a crash starts from nothing
        workdir.mkdir(parents=True)
        durations: dict[str, float] = {}

        phase1_xml = workdir / "phase1.xml"
        hooks.phase(Phase.PORTS, f"open ports of {task.ip}")
        run1 = self._run_phase(
            Phase.PORTS,
            argv.phase1_argv(
                task,
                plan.ports_opts,
                nmap=self.nmap,
                privileged=self.privileged,
                xml_path=str(phase1_xml),
                stats_every=self.stats_every,
                source=self.source,
            ),
            phase_dir=workdir / "phase1",
            timeout=task.timeout,
            cancel=cancel,
            hooks=hooks,
        )
        durations["ports_scan"] = run1.duration
        if run1.cancelled:
            raise Cancelled("cancelled during the open-ports scan")
        if run1.timed_out:
            raise ScanFailed(f"open-ports scan timed out after {task.timeout} s")
        _raise_if_killed(run1, "open-ports scan")
        if run1.returncode != 0:
            raise ScanFailed(f"nmap exited with {run1.returncode} in the open-ports scan: {run1.stderr_tail}")
        # A cancel that arrived after nmap finished phase 1 is honoured here (upstream started phase 2),
        # and before phase 1 is read: at 65,535 ports that takes a while.
        if cancel.is_set():
            raise Cancelled("cancelled between the two phases")
        found = merge.phase1_ports(phase1_xml, task.ip)
        if found is None:
            return Outcome(
                None, (), ("nmap reported no host (down or filtered); nothing to import",), durations
            )
        ports = tuple(found)
        notes: list[str] = []
        phase2_xml: Path | None = None
        if cancel.is_set():
            raise Cancelled("cancelled between the two phases")
        if task.include_services and ports:
            phase2_xml = self._services(
                plan, ports, workdir, cancel=cancel, hooks=hooks, durations=durations, notes=notes
            )

        if cancel.is_set():
            raise Cancelled("cancelled after the scan, before delivery")  # cancelled tasks upload nothing
        report = workdir / "report.xml"
        merge.merge_reports(phase1_xml, phase2_xml, report, target_ip=task.ip, hostnames=task.hostnames)
        return Outcome(report, ports, tuple(notes), durations)

    def _services(
        self,
        plan: Plan,
        ports: tuple[PortRef, ...],
        workdir: Path,
        *,
        cancel: threading.Event,
        hooks: Hooks,
        durations: dict[str, float],
        notes: list[str],
    ) -> Path | None:
        """Phase 2; its XML, or None (with a note why) when the open ports go out without services."""
        task = plan.task
        phase2_xml = workdir / "phase2.xml"
        hooks.phase(Phase.SERVICES, f"service scan of {len(ports)} ports on {task.ip}")
        run2 = self._run_phase(
            Phase.SERVICES,
            argv.phase2_argv(
                task,
                plan.service_opts,
                ports,
                nmap=self.nmap,
                privileged=self.privileged,
                xml_path=str(phase2_xml),
                stats_every=self.stats_every,
                source=self.source,
            ),
            phase_dir=workdir / "phase2",
            timeout=task.timeout,
            cancel=cancel,
            hooks=hooks,
        )
        durations["service_scan"] = run2.duration
        if run2.cancelled:
            raise Cancelled("cancelled during the service scan")
        _raise_if_killed(run2, "service scan")
        if run2.timed_out:
            notes.append(
                f"service detection timed out after {task.timeout} s; open ports delivered without it"
            )
            return None
        if run2.returncode != 0:
            if _no_room(workdir):
                raise DiskFull(workdir.parent)  # not a result without services: a task handed back
            notes.append(f"service detection failed (nmap exited {run2.returncode}): {run2.stderr_tail}")
            return None
        return phase2_xml

    def _run_phase(
        self,
        phase: Phase,
        args: Sequence[str],
        *,
        phase_dir: Path,
        timeout: int,
        cancel: threading.Event,
        hooks: Hooks,
    ) -> NmapRun:
        phase_dir.mkdir()
        try:
            return self.run(
                args,
                workdir=phase_dir,
                timeout=float(timeout),
                cancel=cancel,
                on_start=lambda proc: hooks.nmap_started(phase, proc),
                on_progress=lambda pct: hooks.progress(phase, pct),
                kill_grace=self.kill_grace,
            )
        finally:
            hooks.nmap_finished(phase)


# Less than this free in the work directory after nmap failed: it failed for want of space.
_ROOM = 64 * 1024


def _no_room(path: Path) -> bool:
    try:
        stats = os.statvfs(path)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < _ROOM


def _raise_if_killed(run: NmapRun, what: str) -> None:
    """A negative return code the runner did not cause (no cancel, no timeout) is someone else's signal:
    the OOM killer or an operator. That says nothing about the task, so it is retried, not failed."""
    if run.returncode is not None and run.returncode < 0:
        raise ScanInterrupted(f"nmap was killed by signal {-run.returncode} during the {what}")
