"""Sweep: a /22 scanned address by address, by 1, 2, 4 and 8 instances of one host and by bare nmap.

Targets: bench/sweepnet.py (one namespace answering on 1,024 addresses, 1-5 open banner ports each).
Each address is one Tasker-shaped task, phase 1 `-n -Pn --max-retries 1 -p 1-1024` and phase 2 `-sV -Pn`
on what phase 1 found, all published at once in the real Tasker's order (publish, then its Redis keys),
each for a project of its own, so that the fake ScanLedger counts the uploads of every task apart.

For each instance count N, N instances start (READY), every task is published, and the round ends when
the fake ScanLedger has accepted a report for every task; it then waits a moment more for duplicates.
Throughput is addresses / (last upload - first publish). Then bare nmap runs the same two phases per
address at the same parallelism: `xargs -P N` over a shell script with the worker's own argv (bare.py),
phase 2 on the ports a sed over phase 1's XML finds, compacted as the worker compacts them.

Per N: addresses per minute, the ratio to bare, publish-to-upload latency (which includes the wait in
the queue: most of it, in a sweep), the worker processes' own CPU time (utime + stime, nmap not included)
next to the CPU of the nmap runs under the workers and of the bare run, peak RSS per instance (VmHWM),
and the worker-side time of each task taken from Redis MONITOR (bench/monitor.py: claim -> phase-1 nmap
started, phase-1 reaped -> phase 2 started, phase 2 reaped -> upload accepted), the first 100 tasks
against the last 100 in the order they were claimed.
"""

from __future__ import annotations

import collections
import re
import resource
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import bare, procstat
from bench.lab import Lab, Sent
from bench.monitor import Command, Monitor, timeline
from bench.report import Options, Result, median, ms, percentile

PORTS_OPTS = "-n -Pn --max-retries 1 -p 1-1024"
SERVICE_OPTS = "-sV -Pn"
INSTANCES = (1, 2, 4, 8)
QUICK_INSTANCES, QUICK_ADDRESSES = (1,), 16
PER_INSTANCE = 256  # addresses per instance up to the whole /22: keeps the full sweep within 45 minutes
DUPLICATE_WAIT = 3.0  # seconds after the last upload in which a second upload of a task would be seen
EDGE = 100  # tasks compared at the start and at the end of a round
RATIO_GOAL = 0.95
FLAT_SHARE, FLAT_MARGIN = 0.20, 0.005
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Round:
    instances: int
    addresses: int
    publish_seconds: float  # first publish -> last publish
    wall: float  # first publish -> last upload
    bare_wall: float
    latencies: list[float]
    worker_cpu: float  # seconds, all instances, their own threads
    nmap_cpu: float  # seconds, the nmap runs the instances reaped
    bare_cpu: float  # seconds, xargs and everything under it
    peak_rss_kib: list[int]
    once: int  # tasks uploaded exactly once
    duplicated: int
    missing: int
    overheads: list[float]  # worker-side seconds per task, in claim order

    @property
    def rate(self) -> float:
        return self.addresses / self.wall * 60

    @property
    def bare_rate(self) -> float:
        return self.addresses / self.bare_wall * 60

    @property
    def edge(self) -> int:
        return min(EDGE, len(self.overheads) // 2)

    @property
    def first(self) -> float:
        return median(self.overheads[: self.edge])

    @property
    def last(self) -> float:
        return median(self.overheads[-self.edge :]) if self.edge else float("nan")


def plan(options: Options) -> list[tuple[int, int]]:
    """(instances, addresses) per round."""
    counts = options.instances or (QUICK_INSTANCES if options.quick else INSTANCES)
    if options.addresses:
        return [(n, options.addresses) for n in counts]
    if options.quick:
        return [(n, QUICK_ADDRESSES) for n in counts]
    return [(n, min(1024, PER_INSTANCE * n)) for n in counts]


def run(lab: Lab, options: Options) -> Result:
    sweep = lab.sweep()
    rounds = []
    for n, count in plan(options):
        rounds.append(run_round(lab, n, sweep.addresses[:count]))
        lab.reset()
    return report(rounds, sweep.network, options)


def run_round(lab: Lab, n: int, addresses: list[str]) -> Round:
    workers = [lab.worker(f"w{i + 1}") for i in range(n)]
    cpu = [procstat.cpu_seconds(w.pid) for w in workers]
    nmap_cpu = [procstat.children_cpu_seconds(w.pid) for w in workers]
    with Monitor(lab.redis.client(socket_timeout=None)) as mon:
        sent = [lab.send(ip, PORTS_OPTS, SERVICE_OPTS) for ip in addresses]
        published = time.time()
        projects = {task.project for task in sent}
        lab.ledger.wait_for(
            lambda ledger: projects <= {u.project for u in ledger.uploads},
            timeout=300 + 10 * len(addresses) / n,
        )
        time.sleep(DUPLICATE_WAIT)
    worker_cpu = sum(procstat.cpu_seconds(w.pid) for w in workers) - sum(cpu)
    nmap = sum(procstat.children_cpu_seconds(w.pid) for w in workers) - sum(nmap_cpu)
    rss = [procstat.memory_kib(w.pid)["VmHWM"] for w in workers]
    lab.stop_workers()

    uploads = [u for u in lab.ledger.uploads if u.project in projects]
    counts = collections.Counter(u.project for u in uploads)
    first_upload: dict[str, float] = {}
    for u in sorted(uploads, key=lambda u: u.time):
        first_upload.setdefault(u.project, u.time)
    latencies = [first_upload[t.project] - t.published for t in sent]
    bare_wall, bare_cpu = run_bare(addresses, n)
    return Round(
        instances=n,
        addresses=len(addresses),
        publish_seconds=published - sent[0].published,
        wall=max(first_upload.values()) - sent[0].published,
        bare_wall=bare_wall,
        latencies=latencies,
        worker_cpu=worker_cpu,
        nmap_cpu=nmap,
        bare_cpu=bare_cpu,
        peak_rss_kib=rss,
        once=sum(1 for c in counts.values() if c == 1),
        duplicated=sum(1 for c in counts.values() if c > 1),
        missing=len(projects) - len(counts),
        overheads=_overheads(mon.commands, sent, first_upload, lab.hostname),
    )


def _overheads(
    commands: list[Command], sent: list[Sent], uploaded: dict[str, float], hostname: str
) -> list[float]:
    """Worker-side seconds of each task (start + between the phases + tail), in the order of the claims."""
    by_id: dict[str, list[Command]] = collections.defaultdict(list)
    for c in commands:
        for found in set(UUID.findall(c.text)):
            by_id[found].append(c)
    claimed = []
    for task in sent:
        t = timeline(by_id[task.task_id], task.task_id, hostname)
        if t.claimed is None or len(t.pid_set) < 2 or len(t.pid_cleared) < 2:
            continue
        own = (
            (t.pid_set[0] - t.claimed)
            + (t.pid_set[1] - t.pid_cleared[0])
            + (uploaded[task.project] - t.pid_cleared[1])
        )
        claimed.append((t.claimed, own))
    return [own for _claim, own in sorted(claimed)]


# ------------------------------------------------------------------ bare nmap

# Open ports of phase 1, one per line, sorted as nmap writes them; then joined into ranges as the worker
# joins them (argv.compact_ports), so that phase 2 gets the same -p argument.
OPEN_PORTS = r"""sed -n 's/.*portid="\([0-9]*\)"><state state="open".*/\1/p' "$d/phase1.xml" | awk '
$1 == hi + 1 && n { hi = $1; next }
{ if (n) { out = out sep range(); sep = "," } lo = hi = $1; n = 1 }
function range() { return lo == hi ? lo : lo "-" hi }
END { if (n) print out sep range() }'"""


def bare_script(workdir: Path, sample: str) -> str:
    """sh script for one address ($1): the worker's two nmap commands, with `sample`'s argv as template
    (the address is the last argument, after "--"; the XML path follows -oX)."""

    def template(args: list[str], xml: str) -> str:
        args = list(args)
        assert args[-1] == sample and args[-2] == "--"
        args[args.index("-oX") + 1] = "@XML@"
        args[-1] = "@IP@"
        text = shlex.join(args)
        return text.replace("@XML@", f'"$d/{xml}"').replace("@IP@", '"$1"')

    phase1 = template(bare.phase1_command(sample, PORTS_OPTS, Path("phase1.xml")), "phase1.xml")
    args2 = bare.phase2_command(sample, SERVICE_OPTS, [("tcp", 1)], Path("phase2.xml"))
    args2[args2.index("-p") + 1] = "@PORTS@"
    phase2 = template(args2, "phase2.xml").replace("@PORTS@", '"$ports"')
    return "\n".join(
        [
            "set -eu",
            f"d=$(mktemp -d {shlex.quote(str(workdir))}/bare.XXXXXX)",
            f"{phase1} >/dev/null",
            f"ports=$({OPEN_PORTS})",
            f'if [ -n "$ports" ]; then {phase2} >/dev/null; fi',
            'rm -rf "$d"',
            "",
        ]
    )


def run_bare(addresses: list[str], parallel: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of everything under xargs) for both phases of every address."""
    with tempfile.TemporaryDirectory(prefix="falcoria-bench-sweep-") as tmp:
        script = Path(tmp) / "two-phases.sh"
        script.write_text(bare_script(Path(tmp), addresses[0]))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            ["xargs", "-P", str(parallel), "-n", "1", "sh", str(script)],
            input="\n".join(addresses) + "\n",
            text=True,
            check=True,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


# ------------------------------------------------------------------ figures


def report(rounds: list[Round], network: str, options: Options) -> Result:
    result = Result(
        "sweep", f"Sweep: the addresses of {network}, one task each, -sV in phase 2", options.quick
    )
    result.headers = [
        "instances",
        "addresses",
        "addresses/min",
        "bare nmap addresses/min",
        "ratio",
        "latency p50",
        "p99",
        "worker CPU (not nmap)",
        "nmap CPU: workers / bare",
        "peak RSS per instance",
        "uploaded once",
        f"worker-side per task: first / last {EDGE} (half when fewer)",
    ]
    for r in rounds:
        result.rows.append(
            [
                str(r.instances),
                str(r.addresses),
                f"{r.rate:.1f}",
                f"{r.bare_rate:.1f}",
                f"{r.rate / r.bare_rate:.3f}",
                f"{percentile(r.latencies, 50):.1f} s",
                f"{percentile(r.latencies, 99):.1f} s",
                f"{r.worker_cpu:.1f} s ({r.worker_cpu / r.addresses * 1000:.0f} ms/task)",
                f"{r.nmap_cpu:.0f} s / {r.bare_cpu:.0f} s",
                procstat.mib(max(r.peak_rss_kib)),
                f"{r.once}/{r.addresses}",
                f"{ms(r.first)} / {ms(r.last)}",
            ]
        )
    worst = min(r.rate / r.bare_rate for r in rounds)
    result.goal(
        f"throughput >= {RATIO_GOAL} of bare nmap at every N", f"worst {worst:.3f}", worst >= RATIO_GOAL
    )
    wrong = sum(r.duplicated + r.missing for r in rounds)
    result.goal("every report uploaded exactly once", f"{wrong} tasks with 0 or 2+ uploads", wrong == 0)
    drift = max(r.last - r.first for r in rounds)
    flat = all(r.last - r.first <= max(FLAT_MARGIN, FLAT_SHARE * r.first) for r in rounds)
    result.goal(
        f"worker-side time per task flat from the first {EDGE} tasks to the last "
        f"(median rises at most {FLAT_SHARE:.0%} or {ms(FLAT_MARGIN)})",
        f"largest rise {ms(drift)}",
        flat,
    )
    sizes = sorted({r.addresses for r in rounds})
    if len(sizes) > 1:
        result.notes.append(
            f"fewer addresses for fewer instances ({PER_INSTANCE} per instance, at most 1,024), "
            "so that the whole sweep stays within 45 minutes"
        )
    for r in rounds:
        result.notes.append(
            f"N={r.instances}: published in {r.publish_seconds:.1f} s; "
            f"instances' peak RSS {', '.join(procstat.mib(k) for k in r.peak_rss_kib)}"
        )
    if options.plot_dir is not None:
        try:
            from bench import plots
        except ImportError as exc:
            result.notes.append(f"no plots: {exc} (scripts/bench installs the bench extra)")
        else:
            for name, path in plots.sweep(rounds, options.plot_dir).items():
                result.notes.append(f"![{name}]({path.name})")
    return result
