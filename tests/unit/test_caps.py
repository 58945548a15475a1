"""Raw-socket classification from /proc/<pid>/status text (captured) and the `check` lines."""

from __future__ import annotations

import os

import pytest

from falcoria_worker.caps import RawSockets, cap_eff, classify, describe, needs_privileged_flag, raw_sockets

# /proc/self/status excerpts: a nobody process started with setpriv --ambient-caps=+net_raw, and one without.
STATUS_NET_RAW = """Name:\tpython3
Uid:\t65534\t65534\t65534\t65534
CapInh:\t0000000000002000
CapPrm:\t0000000000002000
CapEff:\t0000000000002000
CapBnd:\t0000000000002000
CapAmb:\t0000000000002000
NoNewPrivs:\t0
"""
STATUS_NOTHING = STATUS_NET_RAW.replace("0000000000002000", "0000000000000000")
STATUS_ROOT = "CapEff:\t000001fffeffffff\n"


def test_cap_eff_parses_the_effective_mask() -> None:
    assert cap_eff(STATUS_NET_RAW) == 0x2000
    assert cap_eff(STATUS_NOTHING) == 0
    assert cap_eff(STATUS_ROOT) == 0x1FFFEFFFFFF
    assert cap_eff("Name:\tx\n") == 0


@pytest.mark.parametrize(
    ("euid", "status", "expected"),
    [
        (0, STATUS_ROOT, RawSockets.ROOT),
        (0, STATUS_NOTHING, RawSockets.ROOT),  # nmap trusts euid 0; so do we
        (65534, STATUS_NET_RAW, RawSockets.CAP_NET_RAW),
        (65534, STATUS_NOTHING, RawSockets.NONE),
        (1000, "CapEff:\t0000000000001000\n", RawSockets.NONE),  # CAP_NET_ADMIN (bit 12) is not enough
    ],
)
def test_classify(euid: int, status: str, expected: RawSockets) -> None:
    assert classify(euid, cap_eff(status)) is expected


def test_this_process() -> None:
    state = raw_sockets()
    if os.geteuid() == 0:
        assert state is RawSockets.ROOT
    assert needs_privileged_flag() == (state is RawSockets.CAP_NET_RAW)
    assert describe() == describe(state)


def test_check_lines() -> None:
    assert (
        describe(RawSockets.CAP_NET_RAW) == "raw sockets: CAP_NET_RAW (non-root) — SYN scans use --privileged"
    )
    assert describe(RawSockets.NONE) == (
        "raw sockets: none — only -sT connect scans possible; grant CAP_NET_RAW (the systemd unit does)"
    )
    assert describe(RawSockets.ROOT).startswith("raw sockets: root — ")
