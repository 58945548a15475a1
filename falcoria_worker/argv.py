"""nmap argv for phase 1 and phase 2, built from already validated parts. Always a list, never a shell string.

Layout: [nmap, *options, -p <ports> | --top-ports N, -6, --privileged, -oX <xml>, --stats-every <t>, --,
target].
The target comes last and after "--", so even a target that looked like an option could not be read as one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from falcoria_worker.errors import Rejected
from falcoria_worker.policy import MAX_PORT, format_port_ranges

if TYPE_CHECKING:
    from falcoria_worker.model import PortRef, ScanTask
    from falcoria_worker.policy import ScanOptions


def compact_ports(ports: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5". Linux refuses a single argv string over 128 KiB, and 65,535 ports written
    out one by one are about 350 KB; compacted they are "1-65535"."""
    return format_port_ranges((port, port) for port in ports)


def _tail(
    task: ScanTask, opts: ScanOptions, *, privileged: bool, xml_path: str, stats_every: str
) -> list[str]:
    tail = []
    if task.ip_version == 6 and not opts.ipv6:
        tail.append("-6")
    if task.ip_version == 4 and opts.ipv6:
        raise Rejected(f"option '-6' refused: target {task.ip} is IPv4", field="options")
    if privileged:
        tail.append("--privileged")
    return [*tail, "-oX", xml_path, "--stats-every", stats_every, "--", task.ip]


def phase1_argv(
    task: ScanTask, opts: ScanOptions, *, nmap: str, privileged: bool, xml_path: str, stats_every: str = "2s"
) -> list[str]:
    ports = []
    if opts.ports is not None:
        ports += ["-p", opts.ports]
    if opts.top_ports is not None:
        ports += ["--top-ports", str(opts.top_ports)]
    tail = _tail(task, opts, privileged=privileged, xml_path=xml_path, stats_every=stats_every)
    return [nmap, *opts.tokens, *ports, *tail]


def _port_list(ports: Sequence[PortRef]) -> tuple[str, bool, bool]:
    """-> (-p expression, any tcp, any udp). T:/U: prefixes only when both protocols are present."""
    by_protocol: dict[str, list[int]] = {"tcp": [], "udp": []}
    for protocol, number in ports:
        if protocol not in by_protocol or not 1 <= number <= MAX_PORT:
            raise ValueError(f"phase 2 port {protocol}/{number} is not a tcp or udp port 1..{MAX_PORT}")
        by_protocol[protocol].append(number)
    tcp, udp = compact_ports(by_protocol["tcp"]), compact_ports(by_protocol["udp"])
    if tcp and udp:
        return f"T:{tcp},U:{udp}", True, True
    return tcp or udp, bool(tcp), bool(udp)


def phase2_argv(
    task: ScanTask,
    opts: ScanOptions,
    ports: Sequence[PortRef],
    *,
    nmap: str,
    privileged: bool,
    xml_path: str,
    stats_every: str = "2s",
) -> list[str]:
    """Service detection on phase 1's open ports. Adds the scan types those ports need when the phase-2
    options lack them: -sU for UDP ports, and -sS next to -sU for TCP ports (nmap scans only UDP when
    -sU is the only scan type; raw sockets are available, since -sU needs them too)."""
    if not ports:
        raise ValueError("phase 2 needs at least one port")
    expression, any_tcp, any_udp = _port_list(ports)
    scan_types = []
    if any_udp and not opts.udp:
        scan_types.append("-sU")
    if any_tcp and (any_udp or opts.udp) and opts.tcp_scan is None:
        scan_types.append("-sS")
    tail = _tail(task, opts, privileged=privileged, xml_path=xml_path, stats_every=stats_every)
    return [nmap, *opts.tokens, *scan_types, "-p", expression, *tail]
