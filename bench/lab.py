"""The benchmark lab: real Redis and RabbitMQ on private ports, the fake ScanLedger in this process, scan
targets in network namespaces, and `falcoria-worker run` instances as child processes.

Everything is built from the test suite's helpers (tests/support, tests/fakes) so the benchmarks drive the
worker exactly as the integration tests do; only the settings differ: production defaults (INFO logs,
STATS_EVERY 2s, LEASE_TTL 60) instead of the tests' fast timers, so the figures are what a host would see.
`Lab` is a context manager and undoes everything it started, also when a benchmark fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench import sweepnet
from tests.fakes.scanledger import FakeScanLedger, Upload
from tests.support import netns
from tests.support.services import RabbitMQ, RedisServer, _new_run_dir, _Registry
from tests.support.tasker import Tasker
from tests.support.workerproc import NotifyReceiver, WorkerProcess, worker_env

BENCH_CLIENT = "bench-tasker"
# Production values where the test helpers use fast timers (tests/support/workerproc.py), and a fleet's
# observers on: Celery task events (for Flower) and the Prometheus textfile (METRICS_DIR under the lab's
# root), so that every figure includes what they cost.
WORKER_SETTINGS = {
    "LOGGER_LEVEL": "INFO",
    "STATS_EVERY": "2s",
    "KILL_GRACE": "2",
    "LEASE_TTL": "60",
    "WORKER_SEND_TASK_EVENTS": "true",
}
METRICS_DIR = "metrics"


@dataclass(frozen=True)
class Sent:
    task_id: str
    project: str
    published: float  # time.time() just before Tasker's publish


@dataclass(frozen=True)
class Targets:
    services: str  # FTP and SSH banners on 21/22, python http.server on 80
    allopen: str  # every TCP port answers with an SSH banner (nftables redirect to one listener)
    blackhole: str  # drops everything: nmap waits on its timeouts


@dataclass
class Lab:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="falcoria-bench-")))
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    hostname: str = field(default_factory=lambda: f"fwbench-{secrets.token_hex(3)}")
    workers: list[WorkerProcess] = field(default_factory=list)
    _sweep: sweepnet.Sweep | None = None

    def __enter__(self) -> Lab:
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stack.close()

    def _start(self) -> None:
        self.stack.callback(shutil.rmtree, self.root, True)
        run_dir = _new_run_dir()
        self.stack.callback(shutil.rmtree, run_dir, True)
        self.stack.callback(_Registry(run_dir).terminate_all)  # whatever a stop below missed
        self.redis = RedisServer.launch(run_dir)
        self.stack.callback(self.redis.stop)
        self.rabbitmq = RabbitMQ.launch(run_dir)
        self.stack.callback(self.rabbitmq.close)
        self.ledger = FakeScanLedger()
        self.ledger.token = self.ledger.add_token()
        self.ledger.project = self.ledger.add_project()
        self.ledger.start()
        self.stack.callback(self.ledger.stop)
        self.targets = self._netns()
        # Named, so that counts of the worker's Redis commands can leave out Tasker's (bench/tracking.py).
        self.tasker = Tasker(self.rabbitmq, self.redis.client(client_name=BENCH_CLIENT))
        self.stack.callback(self.tasker.close)
        self.stack.callback(self.stop_workers)

    def _netns(self) -> Targets:
        netns.remove_leftovers()
        lab = self.net = netns._Lab(f"{netns.PREFIX}{os.getpid()}", netns._free_subnet())
        self.stack.callback(lab.close)
        lab.add_bridge()
        services = lab.add_host("services", "s", 2)
        allopen = lab.add_host("allopen", "a", 3, netns.ALLOPEN_RULES)
        lab.add_host("blackhole", "h", 4, netns.BLACKHOLE_RULES)
        docroot = self.root / "http"
        docroot.mkdir()
        (docroot / "index.html").write_text("<html><title>falcoria bench</title></html>\n")
        lab.start(services, sys.executable, "-m", "http.server", "80", "--directory", str(docroot))
        lab.listener(services, 22, netns.SSH_BANNER)
        lab.listener(services, 21, netns.FTP_BANNER)
        # With a banner, -sV identifies every port from nmap's NULL probe at once (as a real service
        # would); a silent listener makes each port wait out all probes, minutes for 5,000 ports.
        lab.listener(allopen, netns.ALLOPEN_PORT, netns.SSH_BANNER)
        for port in (80, 22, 21):
            netns.wait_listening(lab.ip(2), port)
        netns.wait_listening(lab.ip(3), 4242)
        return Targets(services=lab.ip(2), allopen=lab.ip(3), blackhole=lab.ip(4))

    def sweep(self) -> sweepnet.Sweep:
        """The /22 of sweep targets (bench/sweepnet.py), built on first use: other benchmarks do without."""
        if self._sweep is None:
            self._sweep = sweepnet.build(self.net, 5)
        return self._sweep

    # ------------------------------------------------------------------ workers

    def worker(self, instance: str = "1", *, wait_ready: bool = True, **extra: str) -> WorkerProcess:
        """A started `falcoria-worker run` instance on this lab's host name, READY unless not `wait_ready`."""
        state_dir = self.root / f"state-{instance}"
        state_dir.mkdir(exist_ok=True)
        metrics_dir = self.root / METRICS_DIR
        metrics_dir.mkdir(exist_ok=True)
        sock = self.root / f"notify-{instance}.sock"
        sock.unlink(missing_ok=True)
        env = worker_env(
            self.redis,
            self.rabbitmq,
            self.ledger,
            hostname=self.hostname,
            state_dir=state_dir,
            **{**WORKER_SETTINGS, "METRICS_TEXTFILE_DIR": str(metrics_dir), **extra},
        )
        env["NOTIFY_SOCKET"] = str(sock)
        env["INSTANCE"] = instance
        proc = WorkerProcess(
            instance, env, state_dir, self.root / f"worker-{instance}.log", NotifyReceiver(sock)
        )
        self.workers.append(proc)
        return proc.start(wait_ready=wait_ready)

    def stop_workers(self) -> None:
        while self.workers:
            proc = self.workers.pop()
            with contextlib.suppress(Exception):
                if proc.alive():
                    proc.stop(timeout=30)
            proc.cleanup()

    def reset(self) -> None:
        """Between benchmarks: no worker, an empty Redis, an empty vhost and no recorded uploads."""
        self.stop_workers()
        self.tasker.close()
        self.rabbitmq.reset_vhost()
        self.redis.flush()
        with self.ledger._changed:
            self.ledger._uploads.clear()
            self.ledger._rejections.clear()

    # ------------------------------------------------------------------ tasks

    def send(
        self,
        ip: str,
        ports_opts: str,
        service_opts: str = "-sV -Pn",
        *,
        track_delay: float = 0.0,
        **fields: object,
    ) -> Sent:
        """One Tasker-shaped task in the real Tasker's order (publish, then its Redis keys, `track_delay`
        seconds later), for a project of its own (Tasker's lock is per project, IP and ports, and uploads
        are matched by project)."""
        project = self.ledger.add_project()
        published = time.time()
        task_id = self.tasker.send_scan(
            track_first=False,
            track_delay=track_delay,
            ip=ip,
            open_ports_opts=ports_opts,
            service_opts=service_opts,
            open_ports_str=_ports_str(ports_opts),
            project=uuid.UUID(project),
            mode="append",
            timeout=3600,
            **fields,
        )
        assert task_id is not None, "Tasker's lock refused the task"
        return Sent(task_id, project, published)

    def upload_of(self, sent: Sent, timeout: float) -> Upload:
        """Waits for the upload of `sent` (its project's) and returns it."""

        def find() -> Upload | None:
            return next((u for u in self.ledger.uploads if u.project == sent.project), None)

        self.ledger.wait_for(lambda _f: find() is not None, timeout=timeout)
        found = find()
        assert found is not None
        return found


def _ports_str(ports_opts: str) -> str:
    """Tasker's open_ports_str is the port spec it put in the options (part of its lock key)."""
    match = re.search(r"-p\s*(\S+)", ports_opts)
    return match.group(1).replace(",", " ") if match else "top"


def machine() -> dict[str, str]:
    """Cores, memory and CPU model of this host, for the results file."""
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(re.search(r"MemTotal:\s+(\d+)", meminfo)[1])  # type: ignore[index]
    free_kib = int(re.search(r"MemAvailable:\s+(\d+)", meminfo)[1])  # type: ignore[index]
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{total_kib / 2**20:.1f} GiB",
        "available": f"{free_kib / 2**20:.1f} GiB",
        "cpu": model[1].strip() if model else "unknown",
        "kernel": os.uname().release,
        "nmap": _nmap_version(),
        "load": load_average(),
    }


def load_average() -> str:
    """1, 5 and 15 minute load averages: how much else the CPU was doing (results are not comparable
    across different loads)."""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def _nmap_version() -> str:
    out = subprocess.run(["nmap", "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"Nmap version (\S+)", out)
    return match[1] if match else "unknown"
