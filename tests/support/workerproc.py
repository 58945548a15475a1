"""`falcoria-worker run` as a real child process, wired to the test services.

Its sd_notify datagrams (READY, STATUS, WATCHDOG, STOPPING) arrive on a socket the test owns, the way
systemd would receive them, so tests can wait for READY and watch STATUS change.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


class NotifyReceiver:
    """An AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            with self._lock:
                for line in data.decode(errors="replace").splitlines():
                    self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        with self._lock:
            return [line for _t, line in self.messages]

    def statuses(self) -> list[str]:
        return [line.removeprefix("STATUS=") for line in self.lines() if line.startswith("STATUS=")]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if predicate(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no notify message matched within {timeout} s; got {self.lines()[-20:]}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(1)
        self.sock.close()


@dataclass
class WorkerProcess:
    instance: str
    env: dict[str, str]
    state_dir: Path
    log_path: Path
    notify: NotifyReceiver
    args: tuple[str, ...] = ()  # more command-line arguments of `run`
    prefix: tuple[str, ...] = ()  # runs the worker through this, e.g. ("ip", "netns", "exec", name)
    proc: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)

    @property
    def hostname(self) -> str:
        return self.env["HOSTNAME"]

    @property
    def nodename(self) -> str:
        return f"worker{self.instance}@{self.hostname}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, wait_ready: bool = True) -> WorkerProcess:
        self.notify.messages.clear()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "falcoria_worker",
                "run",
                "--instance",
                self.instance,
                *self.args,
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            self.notify.wait_for(lambda line: line == "READY=1", timeout)
        except AssertionError:
            raise AssertionError(f"worker never READY; log:\n{self.log()[-4000:]}") from None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful stop systemd performs."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.exits.append(rc)
        self.proc = None
        return rc

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload` sends it (ExecReload=)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL the main process only, as a crash would (its nmap group survives it)."""
        if self.proc is not None:
            self.proc.kill()
            self.exits.append(self.proc.wait(10))
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def nmap_pids(self) -> list[int]:
        """nmap processes working for this instance (their XML lives in its state dir)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                cmdline
                and cmdline[0].endswith(b"nmap")
                and any(str(self.state_dir).encode() in a for a in cmdline)
            ):
                pids.append(int(entry.name))
        return pids

    def cleanup_nmap(self) -> None:
        """What systemd does to the rest of the unit's cgroup after its main process died."""
        for pid in self.nmap_pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.cleanup_nmap()
        self.notify.close()


def worker_env(
    redis_server, rabbitmq, ledger, *, hostname: str, state_dir: Path, **extra: str
) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "LANG": "C.UTF-8",
        "HOSTNAME": hostname,
        "STATE_DIR": str(state_dir),
        "RABBITMQ_HOST": rabbitmq.host,
        "RABBITMQ_PORT": str(rabbitmq.port),
        "RABBITMQ_USER": rabbitmq.user,
        "RABBITMQ_PASSWORD": rabbitmq.password,
        "RABBITMQ_VHOST": rabbitmq.vhost,
        "REDIS_HOST": redis_server.host,
        "REDIS_PORT": str(redis_server.port),
        "REDIS_PASS": redis_server.password,
        "REDIS_DB": str(redis_server.db),
        # Tests scan their own namespaces and loopback only.
        "SCOPE_ALLOW": "10.250.0.0/16,127.0.0.0/8",
        "LOGGER_LEVEL": "DEBUG",
        "STATS_EVERY": "200ms",
        "KILL_GRACE": "1",
        "LEASE_TTL": "6",
    }
    if ledger is not None:
        env["BACKEND_BASE_URL"] = ledger.url
        env["WORKER_BACKEND_TOKEN"] = ledger.token
    env.update(extra)
    return env


@pytest.fixture
def worker_factory(redis_server, rabbitmq, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Makes workers sharing one host name (like instances of one machine) unless told otherwise."""
    made: list[WorkerProcess] = []
    host = f"fwtest-{secrets.token_hex(3)}"

    def make(
        instance: str = "1",
        *,
        ledger=None,
        hostname: str | None = None,
        args: tuple[str, ...] = (),
        **extra: str,
    ) -> WorkerProcess:
        state_dir = tmp_path / f"state-{instance}"
        state_dir.mkdir(exist_ok=True)
        sock = tmp_path / f"notify-{instance}.sock"
        env = worker_env(
            redis_server, rabbitmq, ledger, hostname=hostname or host, state_dir=state_dir, **extra
        )
        env["NOTIFY_SOCKET"] = str(sock)
        env["INSTANCE"] = instance
        proc = WorkerProcess(
            instance, env, state_dir, tmp_path / f"worker-{instance}.log", NotifyReceiver(sock), args
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.cleanup()
