"""SOURCE_ADDRESS on this host: that it is one of the host's addresses, and whether nmap needs -e for it.

nmap -S looks the address up among the host's interfaces and sends its raw packets out of the interface
that holds it. That is right when the address sits on the interface the kernel routes through (a second
address on eth0). It is wrong when the address is held where nothing is routed: on `lo` or a dummy
interface (a common way to carry extra public addresses with policy routing), where nmap's packets go
nowhere and every port reads "filtered"; or on no interface at all (a local route of a whole prefix),
where nmap quits ("Could not figure out what device to send the packet out on"). So -e is added exactly
when the interface holding the address is not the one the kernel's route from that address leaves by,
and it names the latter. The route asked for is the one towards a documentation address (never
contacted), i.e. the default route from SOURCE_ADDRESS; it is decided once, at start. Targets behind a
more specific route through yet another interface are not covered: hold the address on that interface.
Without a default route nmap is left to pick the interface itself.

The address is "of this host" when a socket can bind to it, which is what nmap's connect scans, -sV and
NSE do with it. iproute2's `ip -j` gives the interface and the route.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess

from falcoria_worker.argv import Source
from falcoria_worker.errors import ConfigError

KEY = "SOURCE_ADDRESS"
# Where the default route leads; nothing is sent to them (RFC 5737 / RFC 3849).
_PROBE = {4: "192.0.2.1", 6: "2001:db8::1"}


def _ip_json(*args: str) -> list[dict[str, object]]:
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if ip is None:
        raise ConfigError(KEY, "needs the ip command to find its interface", "apt install iproute2")
    done = subprocess.run([ip, "-j", *args], capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or f"ip {' '.join(args)} exited with {done.returncode}")
    return json.loads(done.stdout or "[]")


def _bindable(address: str, version: int) -> bool:
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def holder(address: str) -> str | None:
    """The interface that carries `address`, or None (no interface does)."""
    for link in _ip_json("addr", "show"):
        for info in link.get("addr_info", ()):  # type: ignore[union-attr]
            if info.get("local") == address:
                return str(link["ifname"])
    return None


def route_device(address: str, version: int) -> str | None:
    """The interface the kernel's default route from `address` leaves by; None without a default route
    (targets are then on-link, or behind routes of the interface that holds the address)."""
    try:
        [route] = _ip_json("route", "get", _PROBE[version], "from", address)
    except OSError:
        return None
    return str(route["dev"])


def resolve(text: str) -> Source:
    """The Source for argv; ConfigError when the address is not usable on this host."""
    address = ipaddress.ip_address(text)
    canonical, version = address.compressed, address.version
    if not _bindable(canonical, version):
        raise ConfigError(
            KEY,
            f"{canonical} is not an address of this host",
            "set it to one of the host's own addresses (ip -br addr), or add the address first",
        )
    device = route_device(canonical, version)
    if device is None:
        return Source(canonical, version)
    return Source(canonical, version, None if holder(canonical) == device else device)


def describe(source: Source) -> str:
    if source.interface is None:
        return f"{source.address} is this host's; nmap finds its interface itself"
    return (
        f"{source.address} is this host's; nmap is told -e {source.interface}, the interface it is routed by"
    )
