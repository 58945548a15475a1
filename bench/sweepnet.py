"""A whole /22 of scan targets in one network namespace: 1,024 addresses, each with 1 to 5 open ports.

`ip route add local <net>/22 dev lo` inside the namespace makes its kernel accept every address of the
block as its own, and the host routes the block to the namespace over the lab's bridge. One listener
process per service port, bound to 0.0.0.0, then answers on all 1,024 addresses; an nftables set of
(address, port) pairs decides which addresses have which ports open, and the others answer with a reset,
as a closed port does. Each listener sends a banner that nmap's NULL probe matches, so -sV identifies
the port at once, as it would a real SSH, FTP, SMTP, POP3 or IMAP server.

The block is the first free one of 10.250.4.0/22 .. 10.250.92.0/22: the per-session labs (netns.py)
use 10.250.100-249 and the system tests 10.250.100 and 10.250.120.
"""

from __future__ import annotations

import ipaddress
import random
import re
import subprocess
from dataclasses import dataclass

from tests.support import netns

SERVICES = {  # port -> banner
    21: netns.FTP_BANNER,
    22: netns.SSH_BANNER,
    25: "220 bench.falcoria.test ESMTP Postfix (Debian/GNU)",
    110: "+OK Dovecot ready.",
    143: "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE IDLE AUTH=PLAIN] "
    "Dovecot ready.",
}
SEED = 15  # the mix of open ports is the same in every run


@dataclass(frozen=True)
class Sweep:
    network: str  # "10.250.N.0/22"
    gateway: str  # the namespace's address on the lab bridge
    open_ports: dict[str, list[int]]  # every address of the block -> its open ports

    @property
    def addresses(self) -> list[str]:
        return list(self.open_ports)


def port_mix(addresses: list[str]) -> dict[str, list[int]]:
    rng = random.Random(SEED)
    ports = sorted(SERVICES)
    return {ip: sorted(rng.sample(ports, rng.randint(1, len(ports)))) for ip in addresses}


def _in_use() -> set[int]:
    """Third octets of 10.250.x.x that any address or route on the host already uses."""
    text = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    text += subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True).stdout
    used: set[int] = set()
    for match in re.finditer(r"10\.250\.(\d+)\.\d+(?:/(\d+))?", text):
        octet, prefix = int(match[1]), int(match[2] or 32)
        span = 1 << max(0, 24 - prefix)  # a /22 route covers four octets
        start = octet - octet % span
        used.update(range(start, start + span))
    return used


def _free_block() -> str:
    used = _in_use()
    for third in range(4, 96, 4):
        if not used & set(range(third, third + 4)):
            return f"10.250.{third}.0/22"
    raise RuntimeError("no free /22 in 10.250.4.0-10.250.95.255 for the sweep namespace")


def _rules(mix: dict[str, list[int]]) -> str:
    elements = ",\n        ".join(f"{ip} . {port}" for ip, ports in mix.items() for port in ports)
    service_ports = ", ".join(str(p) for p in sorted(SERVICES))
    return f"""
table ip sweep {{
    set open {{
        type ipv4_addr . inet_service
        elements = {{
        {elements}
        }}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        tcp dport {{ {service_ports} }} ip daddr . tcp dport != @open reject with tcp reset
    }}
}}
"""


def build(lab: netns._Lab, host: int) -> Sweep:
    """Adds the sweep namespace to `lab` (host number `host` on its bridge); lab.close() removes it, and
    the host's route to the block goes with the bridge."""
    network = _free_block()
    gateway = lab.ip(host)
    ns = lab.add_host("sweep", "w", host)
    subprocess.run(["ip", "-n", ns, "route", "add", "local", network, "dev", "lo"], check=True)
    subprocess.run(["ip", "route", "add", network, "via", gateway, "dev", lab.bridge], check=True)
    addresses = [str(ip) for ip in ipaddress.ip_network(network)]
    mix = port_mix(addresses)
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=_rules(mix), text=True, check=True)
    for port, banner in SERVICES.items():
        lab.listener(ns, port, banner)
    first = addresses[0]
    for port in mix[first]:
        netns.wait_listening(first, port)
    return Sweep(network, gateway, mix)
