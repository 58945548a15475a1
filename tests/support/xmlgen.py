"""Deterministic synthetic nmap XML reports, shaped like nmap 7.93's -oX output, for merge tests and
benchmarks. Files are written line by line (never built as a tree), so a 65,535-port pair takes well
under a second and no memory. Real captures live in tests/fixtures/nmap; these cover the sizes and
shapes a loopback scan cannot produce (every port open, OS detection, traceroute, IPv6, UDP)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

PortSpec = tuple[str, int, str]  # (protocol, portid, state)

START = 1795830000  # a fixed clock: the same arguments always give the same bytes
_REASONS = {"open": "syn-ack", "closed": "reset", "filtered": "no-response", "open|filtered": "no-response"}
_ALL_TCP = "1-65535"


def addrtype(ip: str) -> str:
    return "ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4"


def open_tcp(portids: Iterable[int]) -> list[PortSpec]:
    return [("tcp", portid, "open") for portid in portids]


def _header(args: str, scaninfo: Sequence[tuple[str, str, str]], start: int) -> list[str]:
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        "<!DOCTYPE nmaprun>",
        '<?xml-stylesheet href="file:///usr/bin/../share/nmap/nmap.xsl" type="text/xsl"?>',
        f"<!-- Nmap 7.93 scan initiated as: {args.replace('--', '-&#45;')} -->",
        f'<nmaprun scanner="nmap" args={quoteattr(args)} start="{start}" startstr="Sat Nov 28 02:00:00 2026"'
        ' version="7.93" xmloutputversion="1.05">',
    ]
    for scan_type, protocol, services in scaninfo:
        count = sum(_range_size(part) for part in services.split(",") if part)
        lines.append(
            f'<scaninfo type="{scan_type}" protocol="{protocol}" numservices="{count}"'
            f' services="{services}"/>'
        )
    lines += ['<verbose level="0"/>', '<debugging level="0"/>']
    return lines


def compact(portids: Iterable[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5", as nmap writes scaninfo@services."""
    parts: list[str] = []
    run: list[int] = []
    for portid in sorted(set(portids)):
        if run and portid != run[-1] + 1:
            parts.append(_span(run))
            run = []
        run.append(portid)
    if run:
        parts.append(_span(run))
    return ",".join(parts)


def _span(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def _range_size(part: str) -> int:
    low, _, high = part.partition("-")
    return int(high or low) - int(low) + 1


def _host_open(ip: str, start: int, end: int) -> list[str]:
    return [
        f'<host starttime="{start}" endtime="{end}"><status state="up" reason="user-set" reason_ttl="0"/>',
        f'<address addr="{ip}" addrtype="{addrtype(ip)}"/>',
        "<hostnames>",
        "</hostnames>",
    ]


def _footer(end: int, elapsed: str) -> list[str]:
    return [
        f'<runstats><finished time="{end}" timestr="Sat Nov 28 02:10:00 2026"'
        f' summary="Nmap done; 1 IP address (1 host up) scanned in {elapsed} seconds"'
        f' elapsed="{elapsed}" exit="success"/>'
        '<hosts up="1" down="0" total="1"/>',
        "</runstats>",
        "</nmaprun>",
    ]


def _write(path: Path, lines: Iterable[str]) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line)
            out.write("\n")
    return path


def phase1(
    path: Path,
    ip: str,
    ports: Sequence[PortSpec],
    *,
    args: str | None = None,
    extraports: tuple[str, int] | None = None,
) -> Path:
    """A phase-1 report: port states with nmap's table guesses, the way `-n -Pn -p ...` writes them."""
    return _write(
        path, _phase1_lines(args or f"nmap -n -Pn -p {_ALL_TCP} -oX {path.name} {ip}", ip, ports, extraports)
    )


def _phase1_lines(
    args: str, ip: str, ports: Sequence[PortSpec], extraports: tuple[str, int] | None
) -> Iterator[str]:
    yield from _header(args, [("syn", "tcp", _ALL_TCP)], START)
    yield f'<taskprogress task="SYN Stealth Scan" time="{START}" percent="50.00"/>'
    yield from _host_open(ip, START, START + 5)
    yield "<ports>"
    if extraports:
        state, count = extraports
        yield (
            f'<extraports state="{state}" count="{count}">'
            f'<extrareasons reason="{_REASONS[state]}" count="{count}" proto="tcp" ports="1-{count}"/>'
            "</extraports>"
        )
    yield from (_phase1_port(*spec) for spec in ports)
    yield "</ports>"
    yield '<times srtt="20" rttvar="5" to="100000"/>'
    yield "</host>"
    yield from _footer(START + 5, "5.00")


def _phase1_port(protocol: str, portid: int, state: str) -> str:
    return (
        f'<port protocol="{protocol}" portid="{portid}"><state state="{state}" reason="{_REASONS[state]}"'
        f' reason_ttl="64"/><service name="unknown" method="table" conf="3"/></port>'
    )


def phase2(path: Path, ip: str, ports: Sequence[PortSpec]) -> Path:
    """A phase-2 report (-sV -sC -O --traceroute): per port a service with product/version/cpe and three
    scripts (one with a keyless <elem>, as http-server-header writes it, one with a table); per host os,
    uptime, distance, sequences, hostscript and trace."""
    return _write(path, _phase2_lines(path.name, ip, ports))


def _phase2_lines(name: str, ip: str, ports: Sequence[PortSpec]) -> Iterator[str]:
    portlist = compact(portid for _, portid, _ in ports)
    yield from _header(
        f"nmap -sV -sC -O --traceroute -Pn -p {portlist} -oX {name} {ip}",
        [("syn", "tcp", portlist)],
        START + 10,
    )
    yield from _host_open(ip, START + 10, START + 60)
    yield "<ports>"
    yield from (_phase2_port(*spec) for spec in ports)
    yield "</ports>"
    yield from _host_extras(ip)
    yield '<times srtt="25" rttvar="6" to="100000"/>'
    yield "</host>"
    yield from _footer(START + 60, "50.00")


def _phase2_port(protocol: str, portid: int, state: str) -> str:
    product = f"Product{portid % 97}"
    version = f"{portid % 7}.{portid % 13}"
    header = f"Server{portid}/1.0"
    return (
        f'<port protocol="{protocol}" portid="{portid}"><state state="{state}" reason="{_REASONS[state]}"'
        f' reason_ttl="64"/><service name="svc{portid % 50}" product="{product}" version="{version}"'
        f' extrainfo="x{portid % 3}" method="probed" conf="10">'
        f"<cpe>cpe:/a:vendor{portid % 11}:{product.lower()}:{version}</cpe></service>"
        f'<script id="banner" output="{escape("<hello> & " + str(portid))}"/>'
        f'<script id="http-server-header" output="{header}"><elem>{header}</elem>\n</script>'
        f'<script id="ssl-cert" output="Subject: commonName=h{portid}"><table key="subject">'
        f'<elem key="commonName">h{portid}</elem></table><elem>loose</elem><elem>loose2</elem>\n</script>'
        "</port>"
    )


def _host_extras(ip: str) -> list[str]:
    return [
        '<os><portused state="open" proto="tcp" portid="22"/>'
        '<osmatch name="Linux 5.0 - 5.14" accuracy="100" line="67200">'
        '<osclass type="general purpose" vendor="Linux" osfamily="Linux" osgen="5.X" accuracy="100">'
        "<cpe>cpe:/o:linux:linux_kernel:5</cpe></osclass></osmatch></os>",
        '<uptime seconds="3600" lastboot="Sat Nov 28 01:00:00 2026"/>',
        '<distance value="0"/>',
        '<tcpsequence index="260" difficulty="Good luck!" values="1,2,3,4,5,6"/>',
        '<ipidsequence class="All zeros" values="0,0,0,0,0,0"/>',
        '<tcptssequence class="1000HZ" values="A,B,C,D,E,F"/>',
        '<hostscript><script id="clock-skew" output="mean: 0s"><elem key="mean">0</elem></script>'
        '<script id="host-note" output="a, b"><elem>a</elem><elem>b</elem></script></hostscript>',
        f'<trace><hop ttl="1" ipaddr="{ip}" rtt="0.05"/></trace>',
    ]


def all_ports_pair(directory: Path, ip: str = "127.0.0.1", count: int = 65535) -> tuple[Path, Path]:
    """Phase 1 and phase 2 of a host answering on every TCP port 1..count."""
    ports = open_tcp(range(1, count + 1))
    first = phase1(directory / "phase1.xml", ip, ports, args=f"nmap -n -Pn -p 1-{count} -oX phase1.xml {ip}")
    second = phase2(directory / "phase2.xml", ip, ports)
    return first, second


def truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    """The first `fraction` of `source`, as nmap leaves a file when it is killed mid-write."""
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target
