"""What every reliability case measures: which nmap ran for which task on which instance (sampled from
/proc), what ScanLedger accepted per task, what Redis holds afterwards, and whether a secret leaked.

Every task of a case gets its own ScanLedger project, so an upload names its task: "lost" and
"duplicated" are counted per task from the fake's records, not inferred from logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.fakes.scanledger import FakeScanLedger
from tests.support.drive import EXTENSION_KEYS, scan_fields, status, wait_until
from tests.support.tasker import Tasker

TERMINAL = frozenset({"completed", "failed", "cancelled"})
# nmap's argv carries its work directory: <STATE_DIR>/work/<task id>/phase<N>/...
_WORKDIR = re.compile(rb"(/[^\0]*)/work/([^/\0]+)/phase")
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


@dataclass
class Figures:
    """One row of docs/reliability.md."""

    case: str
    runs: int = 1
    faults: Counter[str] = field(default_factory=Counter)
    tasks: int = 0
    lost: int = 0
    duplicated: int = 0
    leaked_keys: int = 0
    parallel_runs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def fault_text(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(self.faults.items())) or "none"


MONOTONIC_SLEEP = Path(__file__).with_name("monotonic_sleep.c")


def monotonic_sleep_shim() -> Path:
    """monotonic_sleep.c built once per version of its source (gcc, from the test dependencies)."""
    source = MONOTONIC_SLEEP.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    shim = Path(tempfile.gettempdir()) / f"falcoria-worker-monotonic-sleep-{digest}.so"
    if not shim.exists():
        partial = shim.with_name(f"{shim.name}.{os.getpid()}")
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(partial), str(MONOTONIC_SLEEP), "-ldl"], check=True
        )
        partial.rename(shim)
    return shim


def faked_clock(offset_file: Path) -> dict[str, str]:
    """The environment that gives one worker process a wall clock of its own (libfaketime), stepped by
    writing an offset such as "+1h" to `offset_file`; its monotonic clock stays true, and so do its
    sleeps on it (monotonic_sleep.c, preloaded first)."""
    offset_file.write_text("+0\n")
    return {
        "LD_PRELOAD": f"{monotonic_sleep_shim()} {LIBFAKETIME}",
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def run_seed() -> int:
    """The seed of a run's random choices: FW_RELIABILITY_SEED replays a run whose seed is reported."""
    return int(os.environ.get("FW_RELIABILITY_SEED") or random.SystemRandom().randrange(1 << 32))


def seeded_random(figures: Figures) -> random.Random:
    """Random fault moments, reproducible (run_seed), the seed noted in the figures."""
    seed = run_seed()
    figures.notes.append(f"seed {seed}")
    return random.Random(seed)


class ProcessWatch(threading.Thread):
    """Samples /proc every 50 ms: the argv of every worker and nmap process (for the secrets check), and
    which instance (state dir) runs nmap for which task at each moment. A task seen in two state dirs in
    the same sample ran twice in parallel."""

    def __init__(self, root: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="process-watch")
        self.root = str(root)  # only nmap under this directory is ours (other sessions may scan too)
        self.interval = interval
        self.argvs: set[bytes] = set()
        self.nmap_tasks: dict[str, set[str]] = {}  # task id -> state dirs that ever ran nmap for it
        self.parallel: set[str] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        now: dict[str, set[str]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if b"falcoria_worker" not in cmdline and b"nmap" not in cmdline.split(b"\0", 1)[0]:
                continue
            self.argvs.add(cmdline)
            match = _WORKDIR.search(cmdline)
            if match and match[1].decode().startswith(self.root):
                task_id, state_dir = match[2].decode(), match[1].decode()
                now.setdefault(task_id, set()).add(state_dir)
                self.nmap_tasks.setdefault(task_id, set()).add(state_dir)
        self.parallel |= {task_id for task_id, dirs in now.items() if len(dirs) > 1}

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class Run:
    """The tasks of one case, each with its own ScanLedger project."""

    def __init__(self, tasker: Tasker, ledger: FakeScanLedger, redis_server: Any) -> None:
        self.tasker = tasker
        self.ledger = ledger
        self.redis_server = redis_server
        self.tasks: dict[str, str] = {}  # task id -> project

    def send(self, fields: dict[str, Any], **extra: Any) -> str:
        project = self.ledger.add_project()
        task_id = self.tasker.send_scan(**fields, project=uuid.UUID(project), mode="append", **extra)
        assert task_id is not None, "Tasker's lock refused the task"
        self.tasks[task_id] = project
        return task_id

    def states(self) -> dict[str, dict[str, str]]:
        return {task_id: status(self.redis_server, task_id) for task_id in self.tasks}

    def delivered(self) -> bool:
        """Every task ended and ScanLedger holds its report. (What ScanLedger accepted is the truth here;
        the status's `delivery` field is checked on its own, see test_service_restarts.)"""
        states = self.states().values()
        return all(s.get("state") in TERMINAL for s in states) and all(self.uploads_per_task().values())

    def wait_delivered(self, timeout: float = 180.0) -> None:
        try:
            wait_until(self.delivered, timeout=timeout, what="every task delivered")
        except AssertionError:
            counts = self.uploads_per_task()
            pending = {
                t: s for t, s in self.states().items() if not counts[t] or s.get("state") not in TERMINAL
            }
            raise AssertionError(f"not delivered: {pending}") from None

    def uploads_per_task(self) -> dict[str, int]:
        per_project = Counter(u.project for u in self.ledger.uploads)
        return {task_id: per_project[project] for task_id, project in self.tasks.items()}

    def settle(self, figures: Figures, watch: ProcessWatch | None = None) -> None:
        """Fill in tasks, lost, duplicated, leaked keys and parallel runs (asserted by the caller)."""
        counts = self.uploads_per_task()
        figures.tasks += len(self.tasks)
        figures.lost += sum(1 for n in counts.values() if n == 0)
        figures.duplicated += sum(n - 1 for n in counts.values() if n > 1)
        figures.leaked_keys += len(leaked_keys(self.tasker, self.redis_server.client()))
        if watch is not None:
            figures.parallel_runs += len(watch.parallel & set(self.tasks))


def leaked_keys(tasker: Tasker, r: redis.Redis) -> list[str]:
    """Keys a finished run must not leave: anything of Tasker's, a held lease, or an extension key that
    would never expire. (Released leases and the status/marker keys expire by design.)"""
    # fw:node:{node} belongs to a live instance (renewed with its heartbeat), like Tasker's worker:{host}.
    leaks = tasker.leftover_keys(ignore=("worker:*", "fw:node:*", "fw:lease:*", *EXTENSION_KEYS))
    for key in r.keys("fw:lease:*"):
        if r.hget(key, "state") == "held":
            leaks.append(f"{key} (held)")
    for pattern in (*EXTENSION_KEYS, "fw:lease:*", "fw:node:*"):
        leaks.extend(f"{key} (no TTL)" for key in r.keys(pattern) if r.ttl(key) == -1)
    return sorted(leaks)


def wait_clean(tasker: Tasker, r: redis.Redis, timeout: float = 30.0) -> None:
    with contextlib.suppress(AssertionError):
        wait_until(lambda: leaked_keys(tasker, r) == [], timeout=timeout, what="Redis clean")


def redis_text(r: redis.Redis) -> str:
    """Every key and value in the db, as text (for the secrets check)."""
    parts: list[str] = []
    for key in r.keys("*"):
        kind = r.type(key)
        value: object
        if kind == "string":
            value = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "set":
            value = r.smembers(key)
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        parts.append(f"{key} {value}")
    return "\n".join(parts)


def secret_exposures(
    secrets: dict[str, str],
    *,
    logs: Iterable[Path],
    r: redis.Redis,
    argvs: Iterable[bytes],
    dirs: Iterable[Path],
) -> list[str]:
    """Where any secret value appears: worker logs, Redis, process arguments, spool/state file names."""
    found = []
    sources: list[tuple[str, str]] = [(f"log {p.name}", p.read_text(errors="replace")) for p in logs]
    sources.append(("redis", redis_text(r)))
    sources.extend(("argv", argv.replace(b"\0", b" ").decode(errors="replace")) for argv in argvs)
    for root in dirs:
        for path in root.rglob("*"):
            sources.append(("file name", str(path)))
            if path.name == "meta.json":
                sources.append((f"spool {path}", path.read_text(errors="replace")))
    for name, value in secrets.items():
        if not value:
            continue
        found.extend(f"{name} in {where}" for where, text in sources if value in text)
    return found


def wait_served(
    tasker: Tasker,
    worker_nodes: Iterable[str],
    redis_server: Any,
    fields: dict[str, Any],
    ledger: FakeScanLedger,
) -> None:
    """The fleet still serves: every instance answers a Celery ping and a fresh task completes."""
    nodes = set(worker_nodes)
    wait_until(lambda: nodes <= set(tasker.ping(timeout=1.0)), timeout=30, what="every instance answers ping")
    task_id = tasker.send_scan(**fields, project=uuid.UUID(ledger.add_project()))
    assert task_id is not None
    wait_until(
        lambda: status(redis_server, task_id).get("state") in TERMINAL,
        timeout=60,
        what="a task after the case",
    )
    assert status(redis_server, task_id)["state"] == "completed", status(redis_server, task_id)


def monotonic_since(start: float) -> float:
    return round(time.monotonic() - start, 1)


def nmap_tasks_of(worker: Any) -> dict[int, str]:
    """PID -> task id of the nmap processes an instance runs now."""
    running = {}
    for pid in worker.nmap_pids():
        with contextlib.suppress(OSError):
            match = _WORKDIR.search(Path(f"/proc/{pid}/cmdline").read_bytes())
            if match:
                running[pid] = match[2].decode()
    return running


def paced_scan(target) -> dict[str, Any]:
    """About 3 s of phase 1 (30 probes 100 ms apart), then a short phase 2 on the banner ports: long
    enough that a random moment lands inside either phase."""
    return scan_fields(target, "1-30", open_ports_opts="-n -Pn --max-retries 1 --scan-delay 100ms -p 1-30")


def statuses_between(worker: Any, start: float, end: float) -> list[str]:
    """The sd_notify STATUS texts an instance sent between two monotonic instants."""
    return [
        line.removeprefix("STATUS=")
        for at, line in list(worker.notify.messages)
        if start <= at < end and line.startswith("STATUS=")
    ]


def first_status_at(worker: Any, predicate: Any, after: float, timeout: float = 60.0) -> float:
    """When the instance first sent a STATUS matching `predicate` after `after` (waits for it)."""
    found: list[float] = []

    def seen() -> bool:
        found[:] = [
            at
            for at, line in list(worker.notify.messages)
            if at >= after and line.startswith("STATUS=") and predicate(line.removeprefix("STATUS="))
        ]
        return bool(found)

    wait_until(seen, timeout=timeout, what=f"a STATUS of {worker.nodename} matching the state")
    return found[0]
