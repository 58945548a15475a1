"""A faithful fake of ScanLedger's report import (contract §5) for tests, benchmarks and system tests.

`check_report()` is ScanLedger's import parser reduced to its verdict: the IPs it would import, or the
status code it would answer. It follows scanledger:app/projects/parsers/new_custom_parser.py and
nmap_to_internal.py (every attribute read with `attrib[...]` or converted with `int()` is required) plus
the verified facts of contract §5.2a. The fake refuses everything the real server refuses, with the same
status code; it must never be more lenient, or our tests would pass against reports production rejects.
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from xml.etree.ElementTree import Element

# falcoria_common.schemas.enums.port.PortState
PORT_STATES = frozenset({"open", "closed", "filtered", "unfiltered", "open|filtered", "closed|filtered"})
# falcoria_common.schemas.enums.port.ProtocolEnum: nmap_to_internal converts every port's protocol to it
PROTOCOLS = frozenset({"tcp", "udp"})
CANNOT_IMPORT = "Cannot import Report"


class ReportRejected(Exception):
    """ScanLedger would answer `status` to this report; `detail` says which rule refused it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class _Missing(Exception):
    """A required part is absent or not convertible: ScanLedger raises KeyError/ValueError -> 500."""


def _attr(el: Element | None, name: str, where: str) -> str:
    if el is None:
        raise _Missing(f"<{where}> missing")
    value = el.get(name)
    if value is None:
        raise _Missing(f"{where}@{name} missing")
    return value


def _int(el: Element | None, name: str, where: str) -> int:
    value = _attr(el, name, where)
    try:
        return int(value)
    except ValueError:
        raise _Missing(f"{where}@{name}={value!r} is not an integer") from None


def _check_root(root: Element) -> None:
    for name in ("scanner", "args", "startstr", "version", "xmloutputversion"):
        _attr(root, name, "nmaprun")
    _int(root, "start", "nmaprun")
    scaninfo = root.find("scaninfo")  # only the first one is read
    for name in ("type", "protocol", "services"):
        _attr(scaninfo, name, "scaninfo")
    _int(scaninfo, "numservices", "scaninfo")
    _int(root.find("verbose"), "level", "verbose")
    _int(root.find("debugging"), "level", "debugging")
    progress = root.find("taskprogress")
    if progress is not None:
        _attr(progress, "task", "taskprogress")
        _int(progress, "time", "taskprogress")
        try:
            float(_attr(progress, "percent", "taskprogress"))
        except ValueError:
            raise _Missing("taskprogress@percent is not a number") from None
        for name in ("remaining", "etc"):
            if progress.get(name) is not None:
                _int(progress, name, "taskprogress")


def _check_script(script: Element) -> None:
    _attr(script, "id", "script")
    _attr(script, "output", "script")
    # Verified against the real server (contract §5.2a): an <elem> without key is a 500. Where inside the
    # script the real parser trips is not known, so every <elem> below the script counts (the stricter
    # reading; merge.py keys them all).
    for elem in script.iter("elem"):
        if elem.get("key") is None:
            raise _Missing(f"script {script.get('id')!r} has an <elem> without key")


def _check_port(port: Element) -> None:
    protocol = _attr(port, "protocol", "port")
    if protocol not in PROTOCOLS:
        raise _Missing(f"port@protocol={protocol!r} is not tcp/udp")
    _int(port, "portid", "port")
    state = port.find("state")
    value = _attr(state, "state", "port/state")
    if value not in PORT_STATES:
        raise _Missing(f"port/state@state={value!r} is not a PortState")
    _attr(state, "reason", "port/state")
    _int(state, "reason_ttl", "port/state")
    service = port.find("service")
    if service is not None:
        if service.get("conf") is not None:
            _int(service, "conf", "service")
        if any(cpe.text is None for cpe in service.findall("cpe")):
            raise _Missing("service/cpe without text")
    for script in port.findall("script"):
        _check_script(script)


def _check_os(os_el: Element) -> None:
    for used in os_el.findall("portused"):
        _attr(used, "state", "portused")
        _attr(used, "proto", "portused")
        _int(used, "portid", "portused")
    for match in os_el.findall("osmatch"):
        _attr(match, "name", "osmatch")
        _int(match, "accuracy", "osmatch")
        if match.get("line") is not None:
            _int(match, "line", "osmatch")
        for osclass in match.findall("osclass"):
            if osclass.get("accuracy") is not None:
                _int(osclass, "accuracy", "osclass")
            if any(cpe.text is None for cpe in osclass.findall("cpe")):
                raise _Missing("osclass/cpe without text")


def _check_host(host: Element) -> str:
    _int(host, "starttime", "host")
    _int(host, "endtime", "host")
    status = host.find("status")
    _attr(status, "state", "host/status")
    _attr(status, "reason", "host/status")
    _int(status, "reason_ttl", "host/status")
    address = host.find("address")  # only the first <address> is read
    addr = _attr(address, "addr", "host/address")
    _attr(address, "addrtype", "host/address")
    try:
        ip = ipaddress.ip_address(addr).compressed
    except ValueError:
        raise _Missing(f"host/address@addr={addr!r} is not an IP address") from None
    ports = host.find("ports")
    if ports is None:
        raise _Missing("<host> without <ports>")
    for port in ports.findall("port"):
        _check_port(port)
    for extra in ports.findall("extraports"):
        _attr(extra, "state", "extraports")
        _int(extra, "count", "extraports")
        for reason in extra.findall("extrareasons"):
            _attr(reason, "reason", "extrareasons")
            _int(reason, "count", "extrareasons")
    os_el = host.find("os")
    if os_el is not None:
        _check_os(os_el)
    uptime = host.find("uptime")
    if uptime is not None:
        _int(uptime, "seconds", "uptime")
        _attr(uptime, "lastboot", "uptime")
    return ip


def check_report(xml: bytes) -> list[str]:
    """The IPs ScanLedger's import would take from `xml` (deduplicated, in report order).

    Raises ReportRejected(400, ...) for an empty file or a report without <host>, and
    ReportRejected(500, ...) for anything ScanLedger's parser crashes on.
    """
    if not xml:
        raise ReportRejected(400, f"{CANNOT_IMPORT}: empty file")
    try:
        # ScanLedger decodes the upload to text before parsing it.
        root = ET.fromstring(xml.decode("utf-8"))  # noqa: S314 - the same parser ScanLedger uses; test input
    except (UnicodeDecodeError, ET.ParseError) as exc:
        raise ReportRejected(500, f"unparsable XML: {exc}") from None
    try:
        _check_root(root)
        ips = [_check_host(host) for host in root.findall("host")]
    except _Missing as exc:
        raise ReportRejected(500, str(exc)) from None
    if not ips:
        raise ReportRejected(400, f"{CANNOT_IMPORT}: no <host>")
    return list(dict.fromkeys(ips))
