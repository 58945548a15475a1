"""Soak: four `falcoria-worker run` instances under a steady stream of tasks for an hour (`--seconds N`
shortens it), with a random fault every few minutes. Runs only when named (`scripts/bench soak`), and
is recorded in docs/reliability.md, not docs/benchmarks.md.

The instances are the lab's (bench/lab.py: production settings, task events and metrics on) with two
changes that keep the run about leaks rather than about give-ups: MAX_ATTEMPTS 8, above the faults one
task can meet (a task rightly failed as poison would count as lost), and UPLOAD_BACKOFF_MAX 30 s, so the
spool delivers within the drain after a ScanLedger outage. A sender thread publishes one Tasker-shaped
task (bench/lab.py's send, in the real Tasker's order) every SEND_EVERY seconds against the lab's
services target, each for a ScanLedger project of its own, so uploads are counted per task
(tests/reliability/kit.py's Run). It pauses while Redis or RabbitMQ is down or blocked: Tasker could not
publish then either, and a half-sent task is Tasker's failure, not the worker's.

Faults, one every `every` seconds (FAULT_EVERY, or the run's length / 6 when shorter, so a 4-minute soak
gets six), each drawn with a seeded random generator (the seed is reported; FW_RELIABILITY_SEED replays
it) and held for `hold` seconds (a third of the interval, at most HOLD_MAX: in an hour's soak longer
than the lease TTL, as in the reliability cases):

* SIGKILL of an instance, the rest of its cgroup killed as systemd does (KillMode=mixed), restarted
  after the unit's RestartSec (test_crash.py);
* Redis stopped and started with its data (test_service_restarts.py);
* RabbitMQ stopped and started (test_service_restarts.py);
* ScanLedger answering 503, then refusing connections (test_ledger_outage.py);
* RabbitMQ's memory alarm blocking every publisher, one instance stopped (SIGTERM) and started during it
  so that it hands its scan back to the blocked broker (test_blocked_broker.py);
* a wall-clock step of +1 h or -1 h of one instance (libfaketime, test_clock_jumps.py), when Debian's
  faketime is installed.

Not in: silent partitions (test_partitions.py) need each instance in a network namespace of its own with
the services reachable through it; the lab runs its instances on the host. A full disk
(test_full_disk.py) needs STATE_DIR on a size-limited mount per instance; the lab's state dirs are plain
directories. Either would change how every instance runs for the whole soak, not only during the fault.

Measured: every task accounted for exactly once (lost, duplicated, and tasks whose nmap ran on two
instances at the same moment, kit.ProcessWatch), Redis keys leaked once the stream stops and the
instances settle (kit.leaked_keys / wait_clean), and, sampled every few seconds, each instance's
resident memory, open file descriptors and threads (from /proc; a restarted instance starts a new
series) and the number of keys without a TTL in Redis (DBSIZE is reported too, but grows by design:
each task's status record stays for STATUS_TTL, a week). An instance that exits by itself is restarted
after RestartSec, as systemd's Restart=on-failure does, and each such exit is reported; when anything
is reported, the worker logs are kept in a directory the report names. A series is flat when the median
of the last fifth of its samples after warm-up (the first WARMUP_SHARE of the run) and before the stream
stops is no more than GROWTH above the median of the first fifth; a series with fewer than MIN_SAMPLES
such samples is too short to judge.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench import procstat
from bench.lab import Lab
from bench.report import Options, Result, median
from tests.reliability.kit import (
    LIBFAKETIME,
    Figures,
    ProcessWatch,
    Run,
    faked_clock,
    leaked_keys,
    run_seed,
    wait_clean,
)
from tests.support.workerproc import WorkerProcess

DEFAULT_SECONDS = 3600.0
INSTANCES = 4
FAULT_EVERY = 300.0
HOLD_MAX = 90.0
SEND_EVERY = 2.0
SAMPLE_EVERY = 5.0
RESTART_SEC = 5.0  # systemd/falcoria-worker@.service's RestartSec
WARMUP_SHARE = 0.10
MIN_SAMPLES = 10
DRAIN_TIMEOUT = 300.0
DUPLICATE_WAIT = 3.0
PORTS_OPTS = "-n -Pn --max-retries 1 -p 21,22,80"
SETTINGS = {"MAX_ATTEMPTS": "8", "UPLOAD_BACKOFF_MAX": "30"}
# (relative, absolute) growth a flat series may show: memory settles in allocator-sized steps, and a
# descriptor, a thread or a few keys come and go with whatever is in flight at the moment of a sample.
GROWTH = {"rss": (0.10, 2048), "fds": (0.0, 3), "threads": (0.0, 1), "keys": (0.25, 20)}
METRICS = ("rss", "fds", "threads")
KINDS = (
    "SIGKILL instance",
    "Redis restart",
    "RabbitMQ restart",
    "ScanLedger outage",
    "memory alarm",
    "clock jump",
)


@dataclass
class Flat:
    samples: int
    first: float
    last: float
    flat: bool | None  # None: too few samples to judge


def flatness(values: Sequence[float], metric: str) -> Flat:
    fifth = len(values) // 5
    if len(values) < MIN_SAMPLES:
        return Flat(len(values), float("nan"), float("nan"), None)
    first, last = median(values[:fifth]), median(values[-fifth:])
    relative, absolute = GROWTH[metric]
    return Flat(len(values), first, last, last <= first * (1 + relative) + absolute)


class Sampler(threading.Thread):
    """Every `every` seconds: /proc of each live instance, keyed by (instance, pid), and DBSIZE."""

    def __init__(self, workers: list[WorkerProcess], r: redis.Redis, every: float) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.workers, self.r, self.every = workers, r, every
        self.series: dict[tuple[str, int], list[tuple[float, dict[str, int]]]] = {}
        self.keys: list[tuple[float, int]] = []  # keys without a TTL
        self.dbsize: list[tuple[float, int]] = []
        self.exits: list[str] = []
        self.lock = threading.Lock()  # held by whoever stops, kills or starts an instance
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.supervise()
            now = time.monotonic()
            for worker in list(self.workers):
                if worker.alive():
                    with contextlib.suppress(OSError, AssertionError):
                        sample = procstat.resources(worker.pid)
                        self.series.setdefault((worker.instance, worker.pid), []).append((now, sample))
            with contextlib.suppress(redis.RedisError):
                self.keys.append((now, self._keys_without_ttl()))
                self.dbsize.append((now, int(self.r.dbsize())))  # type: ignore[arg-type]

    def _keys_without_ttl(self) -> int:
        """Keys that stay until someone deletes them: what leaks pile up in. (DBSIZE grows by design for
        STATUS_TTL, a week: every task leaves its status record behind, with a TTL.)"""
        names = list(self.r.scan_iter(count=1000))
        with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.ttl(name)
            return sum(1 for ttl in pipe.execute() if ttl == -1)

    def supervise(self) -> None:
        """systemd's Restart=on-failure: an instance that exited by itself (not stopped or killed by a
        fault, which hold `lock`) starts again after RestartSec; each such exit is a finding."""
        with self.lock:
            for worker in self.workers:
                proc = worker.proc
                if proc is not None and proc.poll() is not None:
                    worker.exits.append(proc.returncode)
                    worker.proc = None
                    self.exits.append(f"instance {worker.instance} exited by itself with {proc.returncode}")
                    time.sleep(RESTART_SEC)
                    worker.start()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)


class Stream(threading.Thread):
    """One task every `every` seconds, paused while Tasker itself could not publish."""

    def __init__(self, lab: Lab, run: Run, every: float) -> None:
        super().__init__(daemon=True, name="soak-stream")
        self.lab, self.run_, self.every = lab, run, every
        self.lock = threading.Lock()  # held for a send: a pause waits for the send in flight
        self.failed = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            with self.lock:
                try:
                    sent = self.lab.send(self.lab.targets.services, PORTS_OPTS)
                except Exception:
                    self.failed += 1
                    self.lab.tasker.close_amqp()
                    continue
                self.run_.tasks[sent.task_id] = sent.project

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self.lock:
            yield

    def stop(self) -> None:
        self._halt.set()
        self.join(30)


@dataclass
class Soak:
    lab: Lab
    workers: list[WorkerProcess]
    stream: Stream
    rng: random.Random
    hold: float
    clocks: dict[str, Path]
    owner: threading.Lock  # the supervisor's: a fault's stop or kill is not an exit of its own
    notes: list[str] = field(default_factory=list)

    def sigkill(self) -> None:
        worker = self.rng.choice(self.workers)
        with self.owner:
            worker.kill()
            worker.cleanup_nmap()
            time.sleep(RESTART_SEC)
            worker.start()

    def redis_restart(self) -> None:
        with self.stream.paused():
            self.lab.redis.stop(keep_data=True)  # a production Redis persists
            try:
                time.sleep(self.hold)
            finally:
                self.lab.redis.start()

    def rabbitmq_restart(self) -> None:
        with self.stream.paused():
            self.lab.rabbitmq.stop()
            try:
                time.sleep(self.hold)
            finally:
                self.lab.rabbitmq.start()
                self.lab.tasker.close_amqp()  # its connection died with the broker

    def ledger_outage(self) -> None:
        ledger = self.lab.ledger
        ledger.fail_for(503, self.hold / 2)
        try:
            time.sleep(self.hold / 2)
            ledger.refuse()
            time.sleep(self.hold / 2)
        finally:
            ledger.clear_faults()
            ledger.resume()

    def memory_alarm(self) -> None:
        worker = self.rng.choice(self.workers)
        with self.owner, self.stream.paused():
            self.lab.rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "0")
            try:
                time.sleep(self.hold / 2)
                try:
                    rc = worker.stop(timeout=30)  # the unit's TimeoutStopSec
                except subprocess.TimeoutExpired:
                    rc = None
                    worker.kill()  # what systemd does after TimeoutStopSec
                if rc != 0:
                    self.notes.append(f"instance {worker.instance} stopped during the alarm: exit {rc}")
                time.sleep(self.hold / 2)
            finally:
                self.lab.rabbitmq.rabbitmqctl("set_vm_memory_high_watermark", "0.4")
            worker.start()

    def clock_jump(self) -> None:
        instance = self.rng.choice(sorted(self.clocks))
        self.clocks[instance].write_text(f"{self.rng.choice(('+1h', '-1h'))}\n")
        try:
            time.sleep(self.hold)
        finally:
            self.clocks[instance].write_text("+0\n")

    def inject(self, kind: str) -> None:
        actions: dict[str, Callable[[], None]] = {
            "SIGKILL instance": self.sigkill,
            "Redis restart": self.redis_restart,
            "RabbitMQ restart": self.rabbitmq_restart,
            "ScanLedger outage": self.ledger_outage,
            "memory alarm": self.memory_alarm,
            "clock jump": self.clock_jump,
        }
        actions[kind]()


@dataclass
class Outcome:
    seed: int
    seconds: float
    every: float
    hold: float
    instances: int
    figures: Figures
    series: dict[tuple[str, int], list[tuple[float, dict[str, int]]]]
    keys: list[tuple[float, int]]
    dbsize: list[tuple[float, int]]
    window: tuple[float, float]  # monotonic: end of warm-up, end of the stream
    failed_sends: int
    notes: list[str]


def soak(
    lab: Lab,
    *,
    seconds: float,
    every: float,
    instances: int = INSTANCES,
    kinds: Sequence[str] = KINDS,
) -> Outcome:
    seed = run_seed()
    rng = random.Random(seed)
    if not LIBFAKETIME.exists():
        kinds = [k for k in kinds if k != "clock jump"]
    clocks: dict[str, Path] = {}
    workers = []
    for i in range(1, instances + 1):
        extra = {}
        if "clock jump" in kinds:
            clocks[str(i)] = lab.root / f"faketime-{i}"
            extra = faked_clock(clocks[str(i)])
        workers.append(lab.worker(str(i), **SETTINGS, **extra))
    run = Run(lab.tasker, lab.ledger, lab.redis)
    figures = Figures(case="soak")
    watch = ProcessWatch(lab.root)
    sampler = Sampler(workers, lab.redis.client(socket_timeout=1), min(SAMPLE_EVERY, max(seconds / 100, 0.5)))
    stream = Stream(lab, run, SEND_EVERY)
    hold = min(HOLD_MAX, every / 3)
    faults = Soak(lab, workers, stream, rng, hold, clocks, sampler.lock)
    for thread in (watch, sampler, stream):
        thread.start()
    began = time.monotonic()
    try:
        for slot in range(int(seconds // every)):
            moment = began + every * (slot + 0.5) + rng.uniform(-every / 4, every / 4)
            time.sleep(max(0.0, moment - time.monotonic()))
            kind = rng.choice(kinds)
            print(f"soak: {time.monotonic() - began:6.0f} s: {kind}", flush=True)  # progress of a long run
            faults.inject(kind)
            figures.faults[kind] += 1
        time.sleep(max(0.0, began + seconds - time.monotonic()))
    finally:
        stream.stop()
    ended = time.monotonic()
    notes = faults.notes
    print(f"soak: stream stopped after {len(run.tasks)} tasks; draining", flush=True)
    try:
        run.wait_delivered(timeout=min(DRAIN_TIMEOUT, max(60.0, seconds / 2)))
    except AssertionError as pending:
        notes.append(str(pending)[:1000])
        notes.extend(_log_lines(workers, run))
    r = lab.redis.client()
    wait_clean(lab.tasker, r, timeout=90)
    time.sleep(DUPLICATE_WAIT)  # a late second upload would come now
    sampler.stop()
    watch.stop()
    run.settle(figures, watch)
    notes.extend(_findings(lab, workers, sampler, r, keep=bool(notes)))
    return Outcome(
        seed,
        seconds,
        every,
        hold,
        instances,
        figures,
        sampler.series,
        sampler.keys,
        sampler.dbsize,
        (began + WARMUP_SHARE * seconds, ended),
        stream.failed,
        notes,
    )


def _findings(
    lab: Lab, workers: list[WorkerProcess], sampler: Sampler, r: redis.Redis, *, keep: bool
) -> list[str]:
    """Exits, leaked keys, instances down or with a Traceback; the logs kept when there is any (or when
    `keep`: a task was not delivered)."""
    notes = list(sampler.exits)
    notes.extend(f"leaked: {key}" for key in leaked_keys(lab.tasker, r))
    for worker in workers:
        if not worker.alive():
            notes.append(f"instance {worker.instance} is not running at the end")
        if "Traceback" in worker.log():
            notes.append(f"instance {worker.instance} logged a Traceback")
    if notes or keep:  # the lab's root goes with the lab: keep what the findings are read from
        kept = Path(tempfile.mkdtemp(prefix="falcoria-soak-logs-"))
        for worker in workers:
            shutil.copy(worker.log_path, kept)
        notes.append(f"worker logs kept in {kept}")
    return notes


def _log_lines(workers: list[WorkerProcess], run: Run, per_task: int = 6) -> list[str]:
    """The instances' log lines about each undelivered task: what the note of a lost task is read from."""
    counts = run.uploads_per_task()
    lines = []
    for task_id in (t for t, n in counts.items() if n == 0):
        about = [
            f"{task_id[:8]} {w.instance}: {line.strip()[:300]}"
            for w in workers
            for line in w.log().splitlines()
            if task_id in line
        ]
        lines.extend(about[-per_task:])
    return lines


def _window(samples: list[tuple[float, int]], window: tuple[float, float]) -> list[float]:
    return [value for at, value in samples if window[0] <= at <= window[1]]


def _text(f: Flat, unit: Callable[[float], str] = lambda v: f"{v:.0f}") -> str:
    if f.flat is None:
        return f"{f.samples} samples: too short"
    return f"{unit(f.first)} -> {unit(f.last)}{'' if f.flat else ' GROWING'}"


def report(o: Outcome, quick: bool = False) -> Result:
    f = o.figures
    result = Result(
        "soak",
        f"Soak: {o.instances} instances, {o.seconds:.0f} s, a fault every {o.every:.0f} s",
        quick,
        headers=["series (instance, pid)", "samples", "resident memory", "open fds", "threads"],
    )
    verdicts: dict[str, list[bool]] = {m: [] for m in (*METRICS, "keys")}
    for (instance, pid), samples in sorted(o.series.items()):
        per = {m: flatness(_window([(at, s[m]) for at, s in samples], o.window), m) for m in METRICS}
        for metric, flat in per.items():
            if flat.flat is not None:
                verdicts[metric].append(flat.flat)
        result.rows.append(
            [
                f"{instance} ({pid})",
                str(per["rss"].samples),
                _text(per["rss"], lambda v: procstat.mib(int(v))),
                _text(per["fds"]),
                _text(per["threads"]),
            ]
        )
    keys = flatness(_window(o.keys, o.window), "keys")
    if keys.flat is not None:
        verdicts["keys"].append(keys.flat)
    result.rows.append(["Redis keys without a TTL", str(keys.samples), "", "", _text(keys)])
    dbsize = _window(o.dbsize, o.window)
    if dbsize:
        result.notes.append(
            f"Redis DBSIZE {dbsize[0]:.0f} -> {dbsize[-1]:.0f} during the stream: each task's status record"
            " stays for STATUS_TTL (a week) by design"
        )
    result.goal(
        "every task accounted for exactly once",
        f"{f.tasks} tasks, {f.lost} lost, {f.duplicated} duplicated, {f.parallel_runs} run twice at once",
        f.tasks > 0 and f.lost == f.duplicated == f.parallel_runs == 0,
    )
    result.goal(
        "no Redis key leaked after the instances settle", f"{f.leaked_keys} leaked", f.leaked_keys == 0
    )
    names = {
        "rss": "resident memory",
        "fds": "open fds",
        "threads": "threads",
        "keys": "Redis keys without a TTL",
    }
    for metric, flags in verdicts.items():
        judged = f"{sum(flags)} of {len(flags)} series flat (median of the first vs the last fifth)"
        result.goal(f"{names[metric]} flat after warm-up", judged, all(flags) if flags else None)
    result.notes.append(f"seed {o.seed} (FW_RELIABILITY_SEED={o.seed} replays the faults)")
    result.notes.append(f"faults injected: {f.fault_text()}; each held {o.hold:.0f} s")
    settings = ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
    result.notes.append(
        f"a task every {SEND_EVERY:g} s, paused during Redis and RabbitMQ faults; {o.failed_sends} sends "
        f"failed (not counted); worker settings: the lab's plus {settings}"
    )
    result.notes.append(
        f"warm-up: the first {WARMUP_SHARE:.0%} of the run; samples end when the stream stops"
    )
    result.notes.extend(o.notes)
    return result


def run(lab: Lab, options: Options) -> Result:
    seconds = options.seconds or DEFAULT_SECONDS
    return report(soak(lab, seconds=seconds, every=min(FAULT_EVERY, seconds / 6)), options.quick)
