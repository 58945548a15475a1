"""Target scope: which addresses this worker may scan at all, whatever the task says.

The most specific network containing the target decides (longest prefix). Between networks of the same
prefix, what the operator configured beats what is built in, and a deny beats an allow of the same
origin: SCOPE_DENY > SCOPE_ALLOW > built-in deny > the allow-all default. The built-in deny list is always
present. A configured allow list replaces the allow-all default, so allowing 127.0.0.1/32 opens exactly
that address, and allowing 127.0.0.0/8 opens loopback (an operator naming the very network the built-in
list denies means it), while SCOPE_ALLOW and SCOPE_DENY naming the same network deny.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from falcoria_worker.errors import ConfigError, Rejected

Network = IPv4Network | IPv6Network

# Precedence between entries of the same prefix length (higher wins).
_DEFAULT_ALLOW, _BUILTIN_DENY, _CONFIGURED_ALLOW, _CONFIGURED_DENY = range(4)

# Addresses that are never a scan target: this host, link-local neighbours, multicast and reserved space.
BUILTIN_DENY: dict[Network, str] = {
    IPv4Network("0.0.0.0/8"): "'this network'",
    IPv4Network("127.0.0.0/8"): "loopback",
    IPv4Network("169.254.0.0/16"): "link-local",
    IPv4Network("224.0.0.0/4"): "multicast",
    IPv4Network("240.0.0.0/4"): "reserved",
    IPv4Network("255.255.255.255/32"): "broadcast",
    IPv6Network("::/128"): "unspecified",
    IPv6Network("::1/128"): "loopback",
    IPv6Network("fe80::/10"): "link-local",
    IPv6Network("ff00::/8"): "multicast",
}
DEFAULT_ALLOW: tuple[Network, ...] = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))


def _networks(texts: Iterable[str], key: str) -> tuple[Network, ...]:
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ConfigError(key, f"{text!r} is not a network", "use CIDRs such as 192.0.2.0/24") from None
    return tuple(networks)


@dataclass(frozen=True)
class Scope:
    allow: tuple[Network, ...]
    deny: tuple[Network, ...]  # the built-in list first, then the configured entries

    @classmethod
    def from_strings(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> Scope:
        """Build from SCOPE_ALLOW / SCOPE_DENY entries (CIDRs or single addresses); raises ConfigError."""
        return cls(
            allow=_networks(allow, "SCOPE_ALLOW") or DEFAULT_ALLOW,
            deny=tuple(BUILTIN_DENY) + _networks(deny, "SCOPE_DENY"),
        )

    def check(self, ip: str) -> None:
        """Raise Rejected unless `ip` may be scanned; the reason names the deciding network."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            address = None
        # A zone id ("fe80::1%eth0") picks an interface, which is the worker's business, not the task's.
        if address is None or getattr(address, "scope_id", None) is not None:
            raise Rejected(f"target {ip!r} refused: not an IP address", field="ip")
        # An IPv4-mapped IPv6 address reaches the IPv4 host, so it is judged as that host.
        checked = _unmapped(address)
        allow_rank = _DEFAULT_ALLOW if self.allow == DEFAULT_ALLOW else _CONFIGURED_ALLOW
        candidates = [(n.prefixlen, allow_rank, n) for n in _containing(checked, self.allow)]
        candidates += [
            (n.prefixlen, _BUILTIN_DENY if i < len(BUILTIN_DENY) else _CONFIGURED_DENY, n)
            for i, n in enumerate(self.deny)
            if n.version == checked.version and checked in n
        ]
        if not candidates:
            shown = ", ".join(str(network) for network in self.allow)
            raise Rejected(f"target {ip} refused: not in any allowed network ({shown})", field="ip")
        _prefix, rank, network = max(candidates, key=lambda c: (c[0], c[1]))
        if rank in (_BUILTIN_DENY, _CONFIGURED_DENY):
            raise Rejected(f"target {ip} refused: in denied network {network}{_label(network)}", field="ip")


def _unmapped(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _containing(address: IPv4Address | IPv6Address, networks: Iterable[Network]) -> list[Network]:
    return [network for network in networks if network.version == address.version and address in network]


def _label(network: Network) -> str:
    label = BUILTIN_DENY.get(network)
    return f" ({label}, built-in)" if label else " (SCOPE_DENY)"
