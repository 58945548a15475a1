"""nmap argv for phase 1 and phase 2, built from already validated parts. Always a list, never a shell string.

Layout: [nmap, *options, -p <ports> | --top-ports N, -6, --privileged, -S <address> [-e <interface>],
-oX <xml>, --stats-every <t>, --, target].
The target comes last and after "--", so even a target that looked like an option could not be read as one.
-S and -e come from the instance's settings only; the policy refuses both in a task's options, and they are
added after it has checked them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from falcoria_worker.errors import Rejected
from falcoria_worker.policy import MAX_PORT, format_port_ranges

if TYPE_CHECKING:
    from falcoria_worker.model import PortRef, ScanTask
    from falcoria_worker.policy import ScanOptions


# Linux refuses a single argv string over 128 KiB (MAX_ARG_STRLEN); stay well below it.
MAX_PORT_ARG = 100_000


@dataclass(frozen=True)
class Source:
    """The instance's SOURCE_ADDRESS, and the interface nmap must be told (-e) when it cannot find the
    right one itself (source.py decides that, once, at start)."""

    address: str
    version: int  # 4 or 6
    interface: str | None = None

    def args(self) -> list[str]:
        return ["-S", self.address, *(["-e", self.interface] if self.interface else [])]


def compact_ports(ports: Iterable[int], *, bridge: int = 0) -> str:
    """[1, 2, 3, 5] -> "1-3,5"; with bridge=1 -> "1-5" (gaps of up to `bridge` ports are joined).

    65,535 ports written out one by one are about 350 KB, too long for one argument; compacted they are
    "1-65535"."""
    ranges: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if ranges and port - ranges[-1][1] <= bridge + 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return format_port_ranges(ranges)


def _tail(
    task: ScanTask,
    opts: ScanOptions,
    *,
    privileged: bool,
    xml_path: str,
    stats_every: str,
    source: Source | None,
) -> list[str]:
    tail = []
    if task.ip_version == 6 and not opts.ipv6:
        tail.append("-6")
    if task.ip_version == 4 and opts.ipv6:
        raise Rejected(f"option '-6' refused: target {task.ip} is IPv4", field="options")
    if privileged:
        tail.append("--privileged")
    if source is not None:
        if source.version != task.ip_version:  # Engine.prepare refuses such a task first
            raise Rejected(f"target {task.ip} is not IPv{source.version} like {source.address}", field="ip")
        tail += source.args()
    return [*tail, "-oX", xml_path, "--stats-every", stats_every, "--", task.ip]


def phase1_argv(
    task: ScanTask,
    opts: ScanOptions,
    *,
    nmap: str,
    privileged: bool,
    xml_path: str,
    stats_every: str = "2s",
    source: Source | None = None,
) -> list[str]:
    ports = []
    if opts.ports is not None:
        ports += ["-p", opts.ports]
    if opts.top_ports is not None:
        ports += ["--top-ports", str(opts.top_ports)]
    tail = _tail(task, opts, privileged=privileged, xml_path=xml_path, stats_every=stats_every, source=source)
    return [nmap, *opts.tokens, *ports, *tail]


def _port_list(ports: Sequence[PortRef], bridge: int) -> str:
    """The -p expression; T:/U: prefixes only when both protocols are present."""
    by_protocol: dict[str, list[int]] = {"tcp": [], "udp": []}
    for protocol, number in ports:
        if protocol not in by_protocol or not 1 <= number <= MAX_PORT:
            raise ValueError(f"phase 2 port {protocol}/{number} is not a tcp or udp port 1..{MAX_PORT}")
        by_protocol[protocol].append(number)
    tcp = compact_ports(by_protocol["tcp"], bridge=bridge)
    udp = compact_ports(by_protocol["udp"], bridge=bridge)
    return f"T:{tcp},U:{udp}" if tcp and udp else tcp or udp


def _short_port_list(ports: Sequence[PortRef]) -> tuple[str, bool]:
    """-> (expression that fits one argument, whether gaps were bridged). Only a pathological target (say,
    every other port open) needs bridging; the smallest bridge that fits is found by bisection."""
    expression = _port_list(ports, 0)
    if len(expression) <= MAX_PORT_ARG:
        return expression, False
    low, high = 1, MAX_PORT  # bridging MAX_PORT always fits: one range per protocol
    while low < high:
        middle = (low + high) // 2
        if len(_port_list(ports, middle)) <= MAX_PORT_ARG:
            high = middle
        else:
            low = middle + 1
    return _port_list(ports, low), True


def phase2_argv(
    task: ScanTask,
    opts: ScanOptions,
    ports: Sequence[PortRef],
    *,
    nmap: str,
    privileged: bool,
    xml_path: str,
    stats_every: str = "2s",
    source: Source | None = None,
) -> list[str]:
    """Service detection on phase 1's open ports. Adds the scan types those ports need when the phase-2
    options lack them: -sU for UDP ports, and -sS next to -sU for TCP ports (nmap scans only UDP when
    -sU is the only scan type; raw sockets are available, since -sU needs them too). Adds --open when
    the port list had to be bridged to fit in one argument."""
    if not ports:
        raise ValueError("phase 2 needs at least one port")
    expression, bridged = _short_port_list(ports)
    any_tcp = any(protocol == "tcp" for protocol, _ in ports)
    any_udp = any(protocol == "udp" for protocol, _ in ports)
    extra = []
    if any_udp and not opts.udp:
        extra.append("-sU")
    if any_tcp and (any_udp or opts.udp) and opts.tcp_scan is None:
        extra.append("-sS")
    if bridged and "--open" not in opts.tokens:
        extra.append("--open")  # the bridged ports were not open in phase 1; keep them out of the report
    tail = _tail(task, opts, privileged=privileged, xml_path=xml_path, stats_every=stats_every, source=source)
    return [nmap, *opts.tokens, *extra, "-p", expression, *tail]
