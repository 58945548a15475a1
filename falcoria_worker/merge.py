"""Streaming nmap XML: open ports of phase 1, the merge of both phases, ScanLedger sanitising, summary rows.

Every function streams its input with iterparse and clears what it has handled, so memory stays bounded
for a host with all 65,535 ports open in both phases. The merge walks phase 1 and phase 2 side by side:
nmap writes a host's ports in numeric order, TCP before UDP and SCTP (PortList::nextPort), so the phase-2
port that phase 1 needs next is normally the next one read. Ports read ahead are held as serialized bytes
until phase 1 reaches them. A phase 2 that breaks that order is noticed and the merge restarts reading
ahead until each port is found (correct, but it may hold all of phase 2's ports); a broken phase 2
restarts it without phase 2.

ScanLedger (contract §5.2, §5.2a) answers 500 for a `<script>` holding an `<elem>` without `key`, and for a
host without `<ports>`, so both are repaired here. DOCTYPE, comments and the stylesheet PI are dropped by
the parser and never written.
"""

from __future__ import annotations

import ipaddress
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from xml.sax.saxutils import escape

from falcoria_worker.errors import ScanFailed
from falcoria_worker.model import PortRef

# Host children that follow <ports>, in the order nmap writes them (nmap.cc, output.cc).
_HOST_TAIL_ORDER = (
    "os",
    "uptime",
    "distance",
    "tcpsequence",
    "ipidsequence",
    "tcptssequence",
    "hostscript",
    "trace",
    "times",
)
# Host-level results of phase 2 (-O, -sC, --traceroute) that the merged host takes over.
_PHASE2_HOST_TAGS = frozenset(_HOST_TAIL_ORDER) - {"times"}
# Progress ticks: noise for ScanLedger, and nmap writes some without the attributes its own DTD requires.
_DROPPED = frozenset({"taskprogress"})
_NOT_HEADER = frozenset({*_HOST_TAIL_ORDER, "ports", *_DROPPED})  # what the host start must not write
_PROTO_RANK = {"tcp": 0, "udp": 1, "sctp": 2, "ip": 3}
_TEXT_ENTITIES = {"\r": "&#13;"}  # a raw CR would come back as LF from the next parser
_ATTR_ENTITIES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}
_EVENTS = ("start", "end")
_MAX_DEPTH = 4  # nmaprun > host > ports > port: the deepest level any function here looks at


@dataclass(frozen=True, slots=True)  # slots: 65,535 rows must stay small
class PortRow:
    protocol: str
    portid: int
    state: str
    service: str
    product: str
    version: str


class _Phase2Broken(Exception):
    """Phase 2's XML is unreadable or cut short: the merge restarts without it."""


class _Phase2Unordered(Exception):
    """Phase 2's ports are not in nmap's order: the merge restarts without relying on that order."""


# ---------------------------------------------------------------------------------------------------------
# Public functions


def phase1_ports(xml_path: Path, target_ip: str) -> list[PortRef] | None:
    """One pass over phase 1: the target's ports phase 2 should probe (`open`, and for UDP also
    `open|filtered`: a UDP service that ignores nmap's probe looks like that, and -sV can still
    identify it), or None when nmap reported no host at all. Reads the whole file, so a truncated one
    raises ScanFailed; one pass, because the time between the phases is time a cancel waits."""
    target = _norm_ip(target_ip)
    found: list[PortRef] = []
    any_host = False
    matched: bool | None = None
    for depth, event, elem in _walk(xml_path, "phase 1"):
        if event == "start" and depth == 2:
            matched = None
            any_host = any_host or elem.tag == "host"
        elif event == "end" and depth == 3 and elem.tag == "address" and matched is None:
            matched = _norm_ip(elem.get("addr", "")) == target
        elif event == "end" and depth == 4 and elem.tag == "port" and matched and _is_open(elem):
            key = _port_key(elem)
            if key is not None:
                found.append(key)
    return found if any_host else None


def merge_reports(
    phase1: Path, phase2: Path | None, out: Path, *, target_ip: str, hostnames: Sequence[str]
) -> None:
    """Write one ScanLedger-ready report to `out` (rules in docs/design.md, merge.py).

    A truncated or unreadable phase 2 is treated as absent. A truncated phase 1 raises ScanFailed and
    leaves no `out` behind.
    """
    try:
        try:
            try:
                _merge_once(phase1, phase2, out, target_ip, hostnames, in_order=True)
            except _Phase2Unordered:
                _merge_once(phase1, phase2, out, target_ip, hostnames, in_order=False)
        except _Phase2Broken:
            _merge_once(phase1, None, out, target_ip, hostnames, in_order=True)
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def summary(xml_path: Path) -> list[PortRow]:
    """One row per <port> of the report, for logs and the `scan` command."""
    return [
        _port_row(elem)
        for depth, event, elem in _walk(xml_path, "report")
        if event == "end" and depth == 4 and elem.tag == "port"
    ]


# ---------------------------------------------------------------------------------------------------------
# Streaming helpers


def _walk(xml_path: Path, what: str) -> Iterator[tuple[int, str, ET.Element]]:
    """iterparse events of the elements at depth 1..4 (root = 1: nmaprun, host, ports, port), with
    their depth; deeper ones (service, script, ...) are only built, which keeps the Python work per
    port small. Malformed XML becomes ScanFailed naming `what`.

    After its end event, a top-level child and a child of <ports> is detached from its parent, so the
    tree never holds more than one host's non-port elements plus the port being handled.
    """
    stack: list[ET.Element] = []
    try:
        # nmap's own output, and expat resolves no external entities and caps entity expansion (3.11+),
        # so the stdlib parser is safe here; defusedxml would be a dependency of a core module.
        for event, elem in ET.iterparse(xml_path, events=_EVENTS):  # noqa: S314
            if event == "start":
                stack.append(elem)
                _require_nmaprun(elem, len(stack), what)
                if len(stack) <= _MAX_DEPTH:
                    yield len(stack), event, elem
                continue
            depth = len(stack)
            stack.pop()
            if depth > _MAX_DEPTH:
                continue
            yield depth, event, elem
            if depth == 2 or (depth == 4 and stack[-1].tag == "ports"):
                stack[-1].remove(elem)
    except ET.ParseError as exc:
        raise ScanFailed(f"{what} XML is truncated or malformed (nmap killed or failed?): {exc}") from exc
    except OSError as exc:
        raise ScanFailed(f"cannot read {what} XML {xml_path}: {exc.strerror or exc}") from exc


def _require_nmaprun(elem: ET.Element, depth: int, what: str) -> None:
    if depth == 1 and elem.tag != "nmaprun":
        raise ScanFailed(f"{what} XML is not an nmap report (root element <{elem.tag}>)")


def _norm_ip(text: str) -> str:
    """Canonical address text, so "0:0::1", "::0001" and "::1" all match (contract §7: upstream compared
    strings)."""
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        return text.strip()


def _is_open(port: ET.Element) -> bool:
    state = port.find("state")
    name = state.get("state", "") if state is not None else ""
    return name == "open" or (name == "open|filtered" and port.get("protocol") == "udp")


def _port_key(port: ET.Element) -> PortRef | None:
    try:
        return port.get("protocol", ""), int(port.get("portid", ""))
    except ValueError:
        return None


def _order(key: PortRef) -> tuple[int, int, str]:
    """nmap's output order: protocol (TCP, UDP, SCTP, IP), then port number."""
    return _PROTO_RANK.get(key[0], len(_PROTO_RANK)), key[1], key[0]


def _port_row(port: ET.Element) -> PortRow:
    state = port.find("state")
    service = port.find("service")
    svc = service.attrib if service is not None else {}
    # The parser makes a new string per attribute; interning the few distinct protocol, state and
    # service names keeps 65,535 rows small.
    return PortRow(
        protocol=sys.intern(port.get("protocol", "")),
        portid=int(port.get("portid", "0")),
        state=sys.intern(state.get("state", "") if state is not None else ""),
        service=sys.intern(svc.get("name", "")),
        product=svc.get("product", ""),
        version=svc.get("version", ""),
    )


def _fix_keyless_elems(elem: ET.Element) -> None:
    """Give every <elem> without `key` inside a <script> key="<n>", n counting its unkeyed siblings.

    ScanLedger answers 500 otherwise (contract §5.2a); the text is kept as it is.
    """
    for script in elem.iter("script"):
        for parent in script.iter():
            unkeyed = [child for child in parent if child.tag == "elem" and "key" not in child.attrib]
            for index, child in enumerate(unkeyed, start=1):
                child.set("key", str(index))


def _dump(elem: ET.Element) -> bytes:
    """Sanitised serialization of one element, one per line.

    Hand-written because ElementTree.tostring costs twice as much per port (namespace scan, codec
    writer per call); nmap's XML has no namespaces, comments or PIs inside elements.
    """
    _fix_keyless_elems(elem)
    elem.tail = "\n"
    parts: list[str] = []
    _serialize(elem, parts)
    return "".join(parts).encode()


def _serialize(elem: ET.Element, parts: list[str]) -> None:
    parts.append(f"<{elem.tag}{_attrs(elem.attrib)}")
    if elem.text or len(elem):
        parts.append(">")
        if elem.text:
            parts.append(escape(elem.text, _TEXT_ENTITIES))
        for child in elem:
            _serialize(child, parts)
        parts.append(f"</{elem.tag}>")
    else:
        parts.append("/>")
    if elem.tail:
        parts.append(escape(elem.tail, _TEXT_ENTITIES))


def _attrs(attrib: dict[str, str]) -> str:
    return "".join(f' {name}="{escape(value, _ATTR_ENTITIES)}"' for name, value in attrib.items())


def _start_tag(tag: str, attrib: dict[str, str]) -> bytes:
    return f"<{tag}{_attrs(attrib)}>\n".encode()


def _hostname_key(elem: ET.Element) -> str:
    return elem.get("name", "").lower().rstrip(".")


# ---------------------------------------------------------------------------------------------------------
# Phase 2 reader


@dataclass
class _Phase2Head:
    attrib: dict[str, str]
    hostnames: list[ET.Element]


@dataclass
class _Phase2Port:
    key: PortRef
    data: bytes  # sanitised serialization, ready to write


_Phase2Item = _Phase2Head | _Phase2Port | list[ET.Element]  # the last is the host's tail elements


def _phase2_items(path: Path, target: str) -> Iterator[_Phase2Item]:
    """Phase 2's target host as a stream: its head, its ports one by one, then its tail elements.
    The rest of the file is still read, to notice a file nmap never finished."""
    host: ET.Element | None = None
    matched: bool | None = None
    head_sent = taken = False
    for depth, event, elem in _walk(path, "phase 2"):
        if taken or depth < 2:
            continue
        if depth == 2:
            if event == "start":
                host, matched, head_sent = (elem if elem.tag == "host" else None), None, False
            elif host is not None and matched:
                if not head_sent:
                    yield _phase2_head(host)
                yield [child for child in host if child.tag in _PHASE2_HOST_TAGS]
                taken = True
        elif host is None:
            continue
        elif depth == 3 and event == "end" and elem.tag == "address" and matched is None:
            matched = _norm_ip(elem.get("addr", "")) == target
        elif depth == 3 and event == "start" and elem.tag == "ports" and matched:
            head_sent = True
            yield _phase2_head(host)
        elif depth == 4 and event == "end" and elem.tag == "port" and matched:
            key = _port_key(elem)
            if key is not None:
                yield _Phase2Port(key, _dump(elem))


def _phase2_head(host: ET.Element) -> _Phase2Head:
    names = [name for names in host.findall("hostnames") for name in names.findall("hostname")]
    return _Phase2Head(dict(host.attrib), names)


class _Phase2:
    """Pull interface over `_phase2_items` for the phase-1 walk. Any failure becomes _Phase2Broken."""

    def __init__(self, path: Path | None, target: str, *, in_order: bool) -> None:
        self._in_order = in_order  # trust nmap's port order; else read on until the port or the end
        self._items: Iterator[_Phase2Item] = iter(()) if path is None else _phase2_items(path, target)
        self._pending: dict[PortRef, bytes] = {}
        self._last: PortRef | None = None
        self._done = False  # the target host has been read completely (or phase 2 has none)
        self._head: _Phase2Head | None = None
        self._tail: list[ET.Element] = []

    def _pull(self) -> bool:
        """Read the next item of the target host; False when there is none left."""
        if self._done:
            return False
        try:
            item = next(self._items)
        except StopIteration:
            self._done = True
            return False
        except ScanFailed as exc:
            raise _Phase2Broken(str(exc)) from exc
        if isinstance(item, _Phase2Head):
            self._head = item
        elif isinstance(item, _Phase2Port):
            if self._in_order and self._last is not None and _order(item.key) <= _order(self._last):
                raise _Phase2Unordered
            self._pending[item.key] = item.data
            self._last = item.key
        else:
            self._tail = item
            self._done = True
        return True

    def head(self) -> _Phase2Head | None:
        while self._head is None and self._pull():
            pass
        return self._head

    def port(self, key: PortRef) -> bytes | None:
        """Phase 2's version of `key`. In nmap's order phase 2 holds `key` before any later port, so
        reading stops once phase 2 has passed it; phase 1's own order does not matter."""
        while (
            key not in self._pending
            and (not self._in_order or self._last is None or _order(self._last) < _order(key))
            and self._pull()
        ):
            pass
        return self._pending.pop(key, None)

    def leftover_ports(self) -> list[bytes]:
        """Ports phase 2 has and phase 1 did not list (not expected from nmap, but never dropped)."""
        while self._pull():
            pass
        return [self._pending.pop(key) for key in sorted(self._pending, key=_order)]

    def tail(self) -> list[ET.Element]:
        while self._pull():
            pass
        return self._tail

    def finish(self) -> None:
        """Read phase 2 to its end: a file cut short after the host is still a scan nmap did not finish."""
        try:
            for _ in self._items:
                pass
        except ScanFailed as exc:
            raise _Phase2Broken(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------------
# The merge


def _merge_once(
    phase1: Path, phase2: Path | None, out: Path, target_ip: str, hostnames: Sequence[str], *, in_order: bool
) -> None:
    p2 = _Phase2(phase2, _norm_ip(target_ip), in_order=in_order)
    with out.open("wb", buffering=1 << 16) as stream:
        merger = _Merger(stream, p2, _norm_ip(target_ip), hostnames)
        for depth, event, elem in _walk(phase1, "phase 1"):
            merger.feed(depth, event, elem)
        p2.finish()


class _Merger:
    """Writes the merged report while phase 1 streams by; `feed` gets every event of `_walk`."""

    def __init__(self, out: BinaryIO, p2: _Phase2, target: str, hostnames: Sequence[str]) -> None:
        self._out = out
        self._p2 = p2
        self._target = target
        self._user_names = [ET.Element("hostname", name=name, type="user") for name in hostnames]
        self._run_start = ""
        self._host = ET.Element("host")  # the host being read; meaningful while _in_host
        self._in_host = False
        self._is_target = False
        self._target_seen = False  # phase 2 belongs to the first host with the target address
        self._header_written = False
        self._in_ports = False

    def feed(self, depth: int, event: str, elem: ET.Element) -> None:
        if event == "start":
            self._start(depth, elem)
        elif depth == 1:
            self._out.write(b"</nmaprun>\n")
        elif depth == 2:
            self._end_top(elem)
        elif depth == 3 and self._in_host:
            self._end_host_child(elem)
        elif depth == 4 and self._in_ports and elem.tag not in _DROPPED:
            self._write_port(elem)

    def _start(self, depth: int, elem: ET.Element) -> None:
        if depth == 1:
            self._run_start = elem.get("start", "")
            self._out.write(b'<?xml version="1.0" encoding="UTF-8"?>\n')
            self._out.write(_start_tag(elem.tag, dict(elem.attrib)))
        elif depth == 2 and elem.tag == "host":
            self._host, self._in_host, self._is_target, self._header_written = elem, True, False, False
        elif depth == 3 and self._in_host and elem.tag == "ports":
            self._write_header()
            self._out.write(b"<ports>\n")
            self._in_ports = True

    def _end_top(self, elem: ET.Element) -> None:
        if elem.tag == "host":
            self._end_host()
        elif elem.tag not in _DROPPED:
            self._out.write(_dump(elem))

    def _end_host_child(self, elem: ET.Element) -> None:
        # The first <address> names the host. Compare by identity, not by counting: iterparse has
        # usually parsed ahead, so a LAN host's MAC address is already in the tree at this event.
        if elem.tag == "address" and not self._header_written and self._host.find("address") is elem:
            self._is_target = not self._target_seen and _norm_ip(elem.get("addr", "")) == self._target
            self._target_seen = self._target_seen or self._is_target
        elif elem.tag == "ports":
            self._close_ports()
            self._host.remove(elem)

    def _write_port(self, elem: ET.Element) -> None:
        key = _port_key(elem) if elem.tag == "port" else None
        theirs = self._p2.port(key) if self._is_target and key is not None else None
        self._out.write(theirs if theirs is not None else _dump(elem))

    def _close_ports(self) -> None:
        for data in self._p2.leftover_ports() if self._is_target else ():
            self._out.write(data)
        self._out.write(b"</ports>\n")
        self._in_ports = False

    def _write_header(self) -> None:
        """Host start tag, status, addresses, merged hostnames: what nmap writes before <ports>."""
        head = self._p2.head() if self._is_target else None
        self._out.write(_start_tag("host", self._host_times(dict(self._host.attrib), head)))
        header = [
            c for c in self._host if c.tag not in _HOST_TAIL_ORDER and c.tag not in {"ports", *_DROPPED}
        ]
        for child in header:
            self._host.remove(child)
        if not any(child.tag == "hostnames" for child in header):
            after = max(
                (i for i, child in enumerate(header) if child.tag == "address"), default=len(header) - 1
            )
            header.insert(after + 1, ET.Element("hostnames"))
        for child in header:
            self._out.write(_dump(self._merged_hostnames(child, head) if child.tag == "hostnames" else child))
        self._header_written = True

    def _host_times(self, attrib: dict[str, str], head: _Phase2Head | None) -> dict[str, str]:
        """Phase 1's times, with endtime moved to phase 2's end when phase 2 probed the host later.
        ScanLedger requires both; a host without them gets the run's start time (a true lower bound)."""
        theirs = head.attrib.get("endtime", "") if head is not None else ""
        mine = attrib.get("endtime", "")
        if theirs.isdigit() and (not mine.isdigit() or int(theirs) > int(mine)):
            attrib["endtime"] = theirs
        attrib.setdefault("starttime", self._run_start)
        attrib.setdefault("endtime", attrib["starttime"])
        return attrib

    def _merged_hostnames(self, own: ET.Element, head: _Phase2Head | None) -> ET.Element:
        """nmap's names (phase 1, then phase 2), then the task's as type="user"; the first spelling wins."""
        if not self._is_target:
            return own
        merged = ET.Element("hostnames")
        seen: set[str] = set()
        for name in [*own.findall("hostname"), *(head.hostnames if head else []), *self._user_names]:
            key = _hostname_key(name)
            if key and key not in seen:
                seen.add(key)
                merged.append(ET.Element("hostname", dict(name.attrib)))
        return merged

    def _end_host(self) -> None:
        if not self._header_written:
            # No <ports> in phase 1 (host discovery only): ScanLedger still requires the element.
            self._write_header()
            self._out.write(b"<ports>\n")
            self._close_ports()
        for child in self._tail_elements():
            self._out.write(_dump(child))
        self._out.write(b"</host>\n")
        self._in_host = False

    def _tail_elements(self) -> list[ET.Element]:
        """Host elements after <ports>: phase 2's replace phase 1's of the same tag, in nmap's order."""
        own = [child for child in self._host if child.tag not in _DROPPED]
        theirs = self._p2.tail() if self._is_target else []
        taken = {child.tag for child in theirs}
        rank = {tag: i for i, tag in enumerate(_HOST_TAIL_ORDER)}
        merged = [*theirs, *(child for child in own if child.tag not in taken)]
        return sorted(merged, key=lambda child: rank.get(child.tag, len(rank)))
