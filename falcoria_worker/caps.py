"""Raw-socket capability of this process: root, CAP_NET_RAW as a non-root user, or none.

nmap decides it is privileged by `geteuid() == 0` alone, so a non-root process that holds CAP_NET_RAW
(the systemd unit grants it as an ambient capability) must pass `--privileged` or nmap silently falls
back to a connect scan and refuses -sS.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

CAP_NET_RAW_BIT = 13  # linux/capability.h


class RawSockets(StrEnum):
    ROOT = "root"
    CAP_NET_RAW = "cap_net_raw"
    NONE = "none"


def cap_eff(status_text: str) -> int:
    """The effective capability mask from the text of /proc/<pid>/status (0 when the line is missing)."""
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name == "CapEff":
            return int(value.strip(), 16)
    return 0


def classify(euid: int, effective_caps: int) -> RawSockets:
    if euid == 0:
        return RawSockets.ROOT
    if effective_caps >> CAP_NET_RAW_BIT & 1:
        return RawSockets.CAP_NET_RAW
    return RawSockets.NONE


def raw_sockets() -> RawSockets:
    status = Path("/proc/self/status").read_text(encoding="ascii", errors="replace")
    return classify(os.geteuid(), cap_eff(status))


def needs_privileged_flag(state: RawSockets | None = None) -> bool:
    """nmap assumes no raw sockets unless it is root or told `--privileged`: with CAP_NET_RAW alone it
    must be told, or it silently falls back to a connect scan. Judges this process unless `state` is
    given."""
    return (raw_sockets() if state is None else state) is RawSockets.CAP_NET_RAW


_DESCRIPTIONS = {
    RawSockets.ROOT: "raw sockets: root — SYN scans possible (running as root is not needed: "
    "a non-root user with CAP_NET_RAW is enough)",
    RawSockets.CAP_NET_RAW: "raw sockets: CAP_NET_RAW (non-root) — SYN scans use --privileged",
    RawSockets.NONE: "raw sockets: none — only -sT connect scans possible; "
    "grant CAP_NET_RAW (the systemd unit does)",
}


def describe(state: RawSockets | None = None) -> str:
    """One line for the `check` command; describes this process unless `state` is given."""
    return _DESCRIPTIONS[raw_sockets() if state is None else state]
