"""SOURCE_ADDRESS for real: `falcoria-worker scan` in a scanner namespace with several addresses, each
scan seen by the target's listener as coming from the configured one (raw phase 1 with -S, -sV with
it bound), including an address held on `lo`, for which nmap must be told the interface (-e)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.netns import PREFIX, SSH_BANNER, _free_subnet, _Lab, _skip_reason

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PORT = 8022


@dataclass(frozen=True)
class SourceLab:
    scanner: str  # netns
    on_eth0: tuple[str, str]  # two addresses on the scanner's interface
    on_lo: str  # an address held on lo, reached through eth0
    target: str
    peers: Path  # the listener's log of peers; the host's own readiness probe is in it too
    host: str


@pytest.fixture(scope="module")
def source_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SourceLab]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    lab = _Lab(f"{PREFIX}{os.getpid()}s", _free_subnet())
    peers = tmp_path_factory.mktemp("peers") / "peers.txt"
    try:
        lab.add_bridge()
        target = lab.add_host("tgt", "t", 2)
        scanner = lab.add_host("scn", "c", 10)
        on_lo = lab.ip(200)
        for cmd in (
            ("-n", scanner, "addr", "add", f"{lab.ip(11)}/24", "dev", "eth0"),
            ("-n", scanner, "addr", "add", f"{on_lo}/32", "dev", "lo"),
            # The kernel's route from any of its addresses leaves by eth0 (the host does not forward).
            ("-n", scanner, "route", "add", "default", "via", lab.ip(1)),
            ("-n", target, "route", "add", f"{on_lo}/32", "via", lab.ip(10)),
        ):
            subprocess.run(("ip", *cmd), check=True, capture_output=True)
        lab.start(
            target,
            sys.executable,
            "-m",
            "tests.support.listeners",
            *("--port", str(PORT), "--banner", SSH_BANNER, "--peers", str(peers)),
        )
        netns.wait_listening(lab.ip(2), PORT)
        yield SourceLab(scanner, (lab.ip(10), lab.ip(11)), on_lo, lab.ip(2), peers, lab.ip(1))
    finally:
        lab.close()


def cli_in(ns: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "falcoria_worker", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _new_peers(lab: SourceLab, seen: int) -> list[str]:
    lines = lab.peers.read_text().splitlines() if lab.peers.exists() else []
    return [line for line in lines if line != lab.host][seen:]


@pytest.mark.parametrize("which", ["primary", "secondary", "on lo"])
def test_each_scan_comes_from_its_source_address(source_lab: SourceLab, tmp_path: Path, which: str) -> None:
    address = {
        "primary": source_lab.on_eth0[0],
        "secondary": source_lab.on_eth0[1],
        "on lo": source_lab.on_lo,
    }[which]
    seen = len(_new_peers(source_lab, 0))
    proc = cli_in(
        source_lab.scanner,
        "scan",
        source_lab.target,
        *("--allow", "10.250.0.0/16", "-p", str(PORT), "-o", str(tmp_path / "r.xml")),
        *("--ports-opts", "-n -Pn -sS", "--service-opts", "-sV -Pn -n"),
        *("--set", f"SOURCE_ADDRESS={address}"),
    )
    assert proc.returncode == 0, proc.stderr
    # The raw SYN scan (phase 1) only finds the port open if the SYN-ACK came back to `address`.
    assert f"{PORT}/tcp" in proc.stdout and "open" in proc.stdout, proc.stdout
    # The listener logs a peer per accepted connection: the -sV probes of phase 2. The file is written by
    # another process; it has the lines once the scan, which waited for the probes' answers, is over.
    deadline = time.monotonic() + 10
    peers = _new_peers(source_lab, seen)
    while not peers and time.monotonic() < deadline:
        time.sleep(0.1)
        peers = _new_peers(source_lab, seen)
    assert peers and set(peers) == {address}


def test_check_says_where_nmap_needs_the_interface(source_lab: SourceLab) -> None:
    dead = ("--set", "REDIS_PORT=1", "--set", "RABBITMQ_PORT=1", "--set", "RABBITMQ_HOST=127.0.0.1")
    lines = {}
    for address in (source_lab.on_eth0[1], source_lab.on_lo, "10.250.254.254"):
        out = cli_in(source_lab.scanner, "check", *dead, "--set", f"SOURCE_ADDRESS={address}").stdout
        [lines[address]] = [line for line in out.splitlines() if "source address" in line]
    assert lines[source_lab.on_eth0[1]].startswith("ok")
    assert "nmap finds its interface itself" in lines[source_lab.on_eth0[1]]
    assert lines[source_lab.on_lo].startswith("ok") and "-e eth0" in lines[source_lab.on_lo]
    assert lines["10.250.254.254"].startswith("FAIL")
    assert "not an address of this host" in lines["10.250.254.254"]


def test_a_task_of_the_other_family_is_refused(source_lab: SourceLab) -> None:
    proc = cli_in(
        source_lab.scanner,
        "scan",
        "fd00::2",
        "--allow",
        "fd00::/64",
        "--set",
        f"SOURCE_ADDRESS={source_lab.on_lo}",
    )
    assert proc.returncode == 2
    assert "scans from the IPv4 address" in proc.stderr and "SOURCE_ADDRESS" in proc.stderr
