"""The IP this worker registers in Redis for Tasker (`worker:{hostname}` ip), found without asking anyone.

The upstream worker asks api.ipify.org, a third party, at every start and on every `worker.update_ip`.
Here the default is the source address the kernel uses on the default route: the gateway comes from
/proc/net/route (or /proc/net/ipv6_route), and connect() on a UDP socket towards it makes the kernel pick
the source address. A UDP connect only selects a route; no packet leaves the host. Behind NAT that is the
private address, so an operator who wants the public one sets WORKER_IP or points IP_ECHO_URL at an echo
service of their own.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

import requests

from falcoria_worker.config import Settings

log = logging.getLogger(__name__)

_RTF_UP = 0x0001
_RTF_GATEWAY = 0x0002
_RTF_REJECT = 0x0200
# A reply longer than this is not an address; reading stops there.
_ECHO_MAX_BYTES = 256


def default_gateway_v4(route_text: str) -> str | None:
    """Gateway of the best usable IPv4 default route in /proc/net/route text, or None.

    Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; addresses are hex in host
    (little-endian) byte order. An on-link default route (no gateway) yields "0.0.0.0"."""
    best: tuple[int, str] | None = None
    for line in route_text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            dest, gateway, flags, metric, mask = (int(cols[i], 16) for i in (1, 2, 3, 6, 7))
        except ValueError:
            continue
        if dest != 0 or mask != 0 or not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        address = str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def default_gateway_v6(route_text: str) -> str | None:
    """Gateway of the best usable IPv6 default route in /proc/net/ipv6_route text, or None.

    Columns: dest dest_len src src_len next_hop metric refcnt use flags iface (hex, network order).
    The kernel lists an unreachable default route on `lo` (RTF_REJECT); it is skipped."""
    best: tuple[int, str] | None = None
    for line in route_text.splitlines():
        cols = line.split()
        if len(cols) < 10:
            continue
        try:
            dest_len, metric, flags = int(cols[1], 16), int(cols[5], 16), int(cols[8], 16)
            dest, next_hop = int(cols[0], 16), bytes.fromhex(cols[4])
        except ValueError:
            continue
        if dest != 0 or dest_len != 0 or not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        if not flags & _RTF_GATEWAY or len(next_hop) != 16:
            continue
        address = str(ipaddress.IPv6Address(next_hop))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def _source_for(family: socket.AddressFamily, destination: str) -> str | None:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            # connect() on UDP sends nothing: it only asks the kernel to choose the route and source.
            sock.connect((destination, 9))
        except OSError:
            return None
        source = sock.getsockname()[0]
    return None if ipaddress.ip_address(source).is_unspecified else source


def default_route_source_ip(
    route_path: Path = Path("/proc/net/route"), route6_path: Path = Path("/proc/net/ipv6_route")
) -> str | None:
    """Source address of the default route: IPv4 first (Tasker's targets are IPv4), else IPv6."""
    for path, family, parse, on_link in (
        (route_path, socket.AF_INET, default_gateway_v4, "192.0.2.1"),
        (route6_path, socket.AF_INET6, default_gateway_v6, "2001:db8::1"),
    ):
        try:
            text = path.read_text()
        except OSError:
            continue
        gateway = parse(text)
        if gateway is None:
            continue
        # An on-link default route has no gateway to aim at; any address it covers selects it
        # (a documentation address: it is never contacted).
        target = on_link if ipaddress.ip_address(gateway).is_unspecified else gateway
        source = _source_for(family, target)
        if source is not None:
            return source
    return None


def echo_ip(url: str, timeout: float) -> str:
    """The address an operator-run echo service (IP_ECHO_URL) sees; raises on any failure, including a
    reply that is not exactly one IP address."""
    if not url.startswith(("https://", "http://")):
        raise ValueError("IP_ECHO_URL must be an http(s) URL")
    with requests.get(url, timeout=timeout, stream=True, allow_redirects=False) as reply:
        reply.raise_for_status()
        body = reply.raw.read(_ECHO_MAX_BYTES + 1, decode_content=True)
    if len(body) > _ECHO_MAX_BYTES:
        raise ValueError("IP echo reply is too long to be an address")
    text = body.decode("ascii", "replace").strip()
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise ValueError(f"IP echo reply is not an IP address: {text[:60]!r}") from None


def current_ip(settings: Settings) -> str | None:
    """The IP Tasker shows for this worker: configured, else the address nmap sends from, else the
    operator's echo URL, else the local source address of the default route. Never a third-party service."""
    if settings.worker_ip:
        return str(settings.worker_ip)
    if settings.source_address:
        return str(settings.source_address)
    if settings.ip_echo_url:
        try:
            return echo_ip(settings.ip_echo_url, timeout=5.0)
        except Exception as exc:  # an echo outage must not stop registration: fall back to the route
            log.warning("IP echo URL failed (%s); using the default route's source address", exc)
    return default_route_source_ip()
