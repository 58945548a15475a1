"""Scan targets in network namespaces on a private bridge (10.250.<n>.0/24), created per test session.

Hosts (see platform-notes §5):
  services   real listeners: HTTP (python -m http.server), an SSH-like banner, an FTP-like banner
  allopen    nftables redirects every TCP port to one listener, so all 65,535 ports answer "open"
  blackhole  nftables drops all inbound TCP/UDP, so nmap waits on timeouts (slow scans on demand)

`held_service` (per test) adds a listener on the services host that holds a service scan of its port
until the test calls release(): a test that must act while phase 2 runs does not race its end.

Names carry the pytest PID ("fwrn<pid>..."), so a later session removes what a crashed one left
behind and leaves alone the lab of a session that still runs. Needs root; tests that use it skip
otherwise. Only addresses inside 10.250.0.0/16 are ever created here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PREFIX = "fwrn"  # falcoria-worker runner netns; interface names: fwrn<pid>b / fwrn<pid><host letter>
REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 10.0
SSH_BANNER = "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6"
FTP_BANNER = "220 (vsFTPd 3.0.3)"
ALLOPEN_PORT = 7777
HELD_PORT = 2323


@dataclass(frozen=True)
class Target:
    netns: str
    ip: str
    ports: dict[int, str] = field(default_factory=dict)  # open port -> what listens there


@dataclass(frozen=True)
class NetnsLab:
    bridge: str
    host_ip: str  # the host's address on the bridge
    services: Target
    allopen: Target
    blackhole: Target


@dataclass(frozen=True)
class HeldService:
    target: Target
    hold: Path

    def release(self) -> None:
        """Let the service scan of the held port (this one and every later one) finish at once."""
        self.hold.unlink(missing_ok=True)


def _run(*cmd: str, stdin: str | None = None) -> None:
    subprocess.run(cmd, input=stdin, text=True, check=True, capture_output=True)


def _quiet(*cmd: str) -> None:
    subprocess.run(cmd, text=True, check=False, capture_output=True)


def _output(*cmd: str) -> str:
    return subprocess.run(cmd, text=True, check=True, capture_output=True).stdout


def _owner_alive(name: str) -> bool:
    match = re.match(rf"{PREFIX}(\d+)", name)
    return match is None or Path(f"/proc/{match.group(1)}").exists()


def _delete_netns(name: str) -> None:
    # Listeners inside hold nothing the namespace needs, but killing them first avoids orphans.
    pids = subprocess.run(("ip", "netns", "pids", name), text=True, check=False, capture_output=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    _quiet("ip", "netns", "del", name)


def remove_leftovers() -> None:
    """Delete namespaces and links of earlier sessions whose pytest process is gone."""
    for line in _output("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX) and not _owner_alive(name):
            _delete_netns(name)
    for name in re.findall(r"^\d+: ([^:@]+)", _output("ip", "-o", "link", "show"), flags=re.M):
        if name.startswith(PREFIX) and not _owner_alive(name):
            _quiet("ip", "link", "del", name)


def _free_subnet() -> int:
    used = {int(m) for m in re.findall(r"inet 10\.250\.(\d+)\.", _output("ip", "-o", "-4", "addr", "show"))}
    # Start at a PID-derived offset so parallel sessions rarely pick the same subnet.
    for i in range(150):
        octet = 100 + (os.getpid() + i) % 150
        if octet not in used:
            return octet
    raise RuntimeError("no free 10.250.<n>.0/24 subnet for the netns lab")


class _Lab:
    """Builds the lab step by step and records what it created, so close() undoes exactly that."""

    def __init__(self, tag: str, octet: int) -> None:
        self.tag = tag
        self.octet = octet
        self.bridge = f"{tag}b"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def ip(self, host: int) -> str:
        return f"10.250.{self.octet}.{host}"

    def add_bridge(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.ip(1)}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def add_host(self, role: str, letter: str, host: int, nft_rules: str | None = None) -> str:
        netns, veth = f"{self.tag}-{role}", f"{self.tag}{letter}"
        _run("ip", "netns", "add", netns)
        self.namespaces.append(netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        _run("ip", "-n", netns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        if nft_rules is not None:
            _run("ip", "netns", "exec", netns, "nft", "-f", "-", stdin=nft_rules)
        return netns

    def start(self, netns: str, *argv: str) -> None:
        self.processes.append(
            subprocess.Popen(
                ["ip", "netns", "exec", netns, *argv],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def listener(self, netns: str, port: int, banner: str = "") -> None:
        self.start(
            netns, sys.executable, "-m", "tests.support.listeners", "--port", str(port), "--banner", banner
        )

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for netns in self.namespaces:
            _delete_netns(netns)  # also removes the veth pair
        _quiet("ip", "link", "del", self.bridge)


@contextlib.contextmanager
def namespace_on(lab: NetnsLab, role: str, letter: str, host: int) -> Iterator[tuple[str, str]]:
    """A namespace of its own on the lab's bridge, for a worker a test cuts off with nftables inside it:
    yields (namespace, its address). The host side is reached at `lab.host_ip`."""
    part = _Lab(f"{PREFIX}{os.getpid()}", int(lab.host_ip.split(".")[2]))
    try:
        yield part.add_host(role, letter, host), part.ip(host)
    finally:
        for netns in part.namespaces:
            _delete_netns(netns)


class Forwarder:
    """Pipes TCP from `bind_ip`:`port` to a service on loopback, so that a worker in a namespace reaches the
    session's Redis, RabbitMQ or fake ScanLedger through the bridge; dropping its packets inside the
    namespace cuts that worker off alone."""

    def __init__(self, bind_ip: str, port: int, target_port: int) -> None:
        self.port = port
        self.target_port = target_port
        self._server = socket.create_server((bind_ip, port))
        self._sockets: list[socket.socket] = [self._server]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name=f"forward-{port}").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _addr = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return  # closed (or the service is gone: the client sees its connection drop)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
                sock.close()


def wait_listening(ip: str, port: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


ALLOPEN_RULES = f"""
table ip allopen {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 1-65535 redirect to :{ALLOPEN_PORT}
    }}
}}
"""

BLACKHOLE_RULES = """
table inet blackhole {
    chain input {
        type filter hook input priority filter; policy accept;
        meta l4proto { tcp, udp } drop
    }
}
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "nft") if shutil.which(tool) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def netns_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsLab]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    remove_leftovers()
    lab = _Lab(f"{PREFIX}{os.getpid()}", _free_subnet())
    try:
        lab.add_bridge()
        services = lab.add_host("services", "s", 2)
        allopen = lab.add_host("allopen", "a", 3, ALLOPEN_RULES)
        blackhole = lab.add_host("blackhole", "h", 4, BLACKHOLE_RULES)
        docroot = tmp_path_factory.mktemp("http")
        (docroot / "index.html").write_text("<html><title>falcoria test</title></html>\n")
        lab.start(services, sys.executable, "-m", "http.server", "80", "--directory", str(docroot))
        lab.listener(services, 22, SSH_BANNER)
        lab.listener(services, 21, FTP_BANNER)
        # A banner lets -sV identify each port from its first probe instead of waiting out every probe.
        lab.listener(allopen, ALLOPEN_PORT, SSH_BANNER)
        for port in (80, 22, 21):
            wait_listening(lab.ip(2), port)
        wait_listening(lab.ip(3), 4242)  # any port: proves the redirect as well as the listener
        yield NetnsLab(
            bridge=lab.bridge,
            host_ip=lab.ip(1),
            services=Target(services, lab.ip(2), {21: "ftp", 22: "ssh", 80: "http"}),
            allopen=Target(allopen, lab.ip(3), {ALLOPEN_PORT: "listener behind the redirect"}),
            blackhole=Target(blackhole, lab.ip(4)),
        )
    finally:
        lab.close()


@pytest.fixture
def held_service(netns_lab: NetnsLab, tmp_path: Path) -> Iterator[HeldService]:
    hold = tmp_path / "hold"
    hold.touch()
    services = netns_lab.services
    argv = [sys.executable, "-m", "tests.support.listeners", "--port", str(HELD_PORT), "--hold", str(hold)]
    proc = subprocess.Popen(
        ["ip", "netns", "exec", services.netns, *argv],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_listening(services.ip, HELD_PORT)
        yield HeldService(Target(services.netns, services.ip, {HELD_PORT: "held"}), hold)
    finally:
        hold.unlink(missing_ok=True)  # frees a scan still held, before its listener goes
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
