"""The same two nmap commands the worker runs, run bare: the baseline every ratio is taken against.

The argv comes from the worker's own argv.py (the options passed through policy.py first), so the only
difference to a worker run is the worker around it: same -oX file output, same --stats-every.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from falcoria_worker import argv, merge
from falcoria_worker.model import Phase, PortRef, parse_task
from falcoria_worker.policy import check_options

STATS_EVERY = "2s"  # the worker's default, as in bench/lab.py


@dataclass(frozen=True)
class BareRun:
    phase1: float
    phase2: float
    open_ports: int

    @property
    def total(self) -> float:
        return self.phase1 + self.phase2


def _task(ip: str, ports_opts: str, service_opts: str):  # -> ScanTask
    return parse_task(
        {
            "ip": ip,
            "hostnames": [],
            "project": "00000000-0000-4000-8000-000000000000",
            "open_ports_opts": ports_opts,
            "service_opts": service_opts,
            "timeout": 3600,
            "include_services": True,
            "mode": "append",
            "user": {"id": "00000000-0000-4000-8000-000000000001", "username": "bench"},
            "open_ports_str": "bench",
            "track_history": True,
        }
    )


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True
    )
    return time.perf_counter() - start


def phase1_command(ip: str, ports_opts: str, xml_path: Path) -> list[str]:
    """The worker's phase-1 argv for these options (for runs the caller controls itself)."""
    task = _task(ip, ports_opts, "-sV -Pn")
    opts = check_options(ports_opts, Phase.PORTS)
    return argv.phase1_argv(
        task, opts, nmap="nmap", privileged=False, xml_path=str(xml_path), stats_every=STATS_EVERY
    )


def phase2_command(ip: str, service_opts: str, ports: list[PortRef], xml_path: Path) -> list[str]:
    """The worker's phase-2 argv for these options and the ports phase 1 found."""
    task = _task(ip, "-n -Pn", service_opts)
    opts = check_options(service_opts, Phase.SERVICES)
    return argv.phase2_argv(
        task, opts, ports, nmap="nmap", privileged=False, xml_path=str(xml_path), stats_every=STATS_EVERY
    )


def run_bare(ip: str, ports_opts: str, service_opts: str = "-sV -Pn", *, services: bool = True) -> BareRun:
    """Phase 1, then phase 2 on the ports phase 1 found (skipped when none or not `services`), each timed
    from spawn to exit."""
    with tempfile.TemporaryDirectory(prefix="falcoria-bench-bare-") as tmp:
        p1, p2 = Path(tmp) / "phase1.xml", Path(tmp) / "phase2.xml"
        t1 = _run(phase1_command(ip, ports_opts, p1))
        ports = merge.phase1_ports(p1, ip) or []
        if not ports or not services:
            return BareRun(t1, 0.0, len(ports))
        t2 = _run(phase2_command(ip, service_opts, ports, p2))
        return BareRun(t1, t2, len(ports))
