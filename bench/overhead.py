"""Overhead: publish-to-upload time of Tasker-shaped tasks against the same two nmap commands run bare.

The target is the lab's services host (FTP and SSH banners, python http.server: 3 open ports); phase 1 is
`-n -Pn --max-retries 1 -p 1-1024`, phase 2 `-sV -Pn` on what phase 1 found, as Tasker sends them. Worker
tasks and bare runs alternate, so drift of the machine (other work, CPU frequency) hits both alike; each
task is published only after the previous one was uploaded, so no task waits in the queue.

Publish-to-upload runs from just before Tasker's publish to the moment the fake ScanLedger accepted the
report. Redis MONITOR splits it (bench/monitor.py): pick-up (publish -> lease claim), start (claim -> PID of
phase 1's nmap recorded), the two nmap runs as the worker saw them, the gap between them, and the tail
(last nmap reaped -> report accepted: merge, spool with fsync, HTTP upload).
"""

from __future__ import annotations

import time

from bench import bare
from bench.lab import Lab, Sent
from bench.monitor import Command, Monitor, timeline
from bench.procstat import cpu_seconds
from bench.report import Result, median, ms, percentile
from tests.fakes.scanledger import Upload

PORTS_OPTS = "-n -Pn --max-retries 1 -p 1-1024"
SERVICE_OPTS = "-sV -Pn"
TASKS, QUICK_TASKS = 30, 5
IDLE_SECONDS = 3.0
UPSTREAM = "upstream worker: 6.565 s vs 6.483 s bare, ratio 1.013, ~80 ms overhead, pick-up 11 ms"


def run(lab: Lab, quick: bool, settings: dict[str, str]) -> Result:
    count = QUICK_TASKS if quick else TASKS
    ip = lab.targets.services
    worker = lab.worker("1", **settings)
    # Warm-up, not counted: first connections, nmap's data files into the page cache.
    lab.upload_of(lab.send(ip, PORTS_OPTS, SERVICE_OPTS), timeout=120)
    bare.run_bare(ip, PORTS_OPTS, SERVICE_OPTS)

    idle_cpu = cpu_seconds(worker.pid)
    time.sleep(IDLE_SECONDS)
    idle_cpu = (cpu_seconds(worker.pid) - idle_cpu) / IDLE_SECONDS
    busy_cpu = cpu_seconds(worker.pid)
    e2e: list[float] = []
    bares: list[bare.BareRun] = []
    sent = []
    with Monitor(lab.redis.client(socket_timeout=None)) as mon:
        for _ in range(count):
            bares.append(bare.run_bare(ip, PORTS_OPTS, SERVICE_OPTS))
            task = lab.send(ip, PORTS_OPTS, SERVICE_OPTS)
            upload = lab.upload_of(task, timeout=120)
            e2e.append(upload.time - task.published)
            sent.append((task, upload))
        # The delivery mark follows the upload; give the last one a moment to land in the monitor.
        lab.redis.client().ping()
    commands = mon.commands
    busy_cpu = cpu_seconds(worker.pid) - busy_cpu

    parts = _split(commands, sent, lab.hostname)
    totals = [b.total for b in bares]
    diffs = [w - b for w, b in zip(e2e, totals, strict=True)]
    ratio = median(e2e) / median(totals)
    fixed = median(e2e) - median(totals)

    result = Result("overhead", f"Overhead: {count} tasks, 3 open ports, -sV in phase 2", quick)
    result.headers = ["figure", "median", "p95", "min", "max"]
    result.rows.append(_row("publish-to-upload (worker)", e2e))
    result.rows.append(_row("bare nmap, both phases", totals))
    result.rows.append(_row("  bare phase 1", [b.phase1 for b in bares]))
    result.rows.append(_row("  bare phase 2", [b.phase2 for b in bares]))
    result.rows.append(_row("worker - bare (paired)", diffs, unit_ms=True))
    labels = {
        "pickup": "  pick-up: publish -> lease claimed",
        "start": "  start: claim -> phase-1 nmap PID recorded",
        "nmap1": "  phase-1 nmap as the worker ran it",
        "between": "  between the phases (parse phase 1, status, spawn)",
        "nmap2": "  phase-2 nmap as the worker ran it",
        "tail": "  tail: phase-2 nmap reaped -> upload accepted",
    }
    for key, label in labels.items():
        result.rows.append(_row(label, parts[key], unit_ms=True))
    result.goal("ratio median(worker) / median(bare) <= 1.01", f"{ratio:.4f}", ratio <= 1.01)
    result.goal("fixed per-task overhead (median worker - median bare) <= 50 ms", ms(fixed), fixed <= 0.050)
    result.goal("median of paired differences <= 50 ms", ms(median(diffs)), median(diffs) <= 0.050)
    overhead_parts = sum(median(parts[k]) for k in ("pickup", "start", "between", "tail"))
    result.notes.append(
        f"worker-side steps (pick-up + start + between + tail, medians): {ms(overhead_parts)}; "
        f"the rest of the difference is nmap itself running slower or faster under the worker "
        f"(phase 1 {ms(median(parts['nmap1']) - median([b.phase1 for b in bares]))}, "
        f"phase 2 {ms(median(parts['nmap2']) - median([b.phase2 for b in bares]))}, worker's view minus bare)"
    )
    per_task = busy_cpu / count
    about = [[c for c in commands if task.task_id in c.text] for task, _ in sent]
    # EXISTS of the metadata key: the worker's checks that Tasker still tracks the task (polled while
    # Tasker's write has not landed yet); the start step's time says whether any of them waited.
    checks = median(
        [
            float(sum(c.text.upper().startswith("EXISTS") and ":metadata:" in c.text for c in cs))
            for cs in about
        ]
    )
    result.notes.append(
        f"Redis commands naming the task (MULTI bodies counted one by one), per task (median): "
        f"{median([float(len(cs)) for cs in about]):.0f}; "
        f"metadata checks per task (median): {checks:.0f}"
    )
    result.notes.append(
        f"worker CPU (its own threads, not nmap): {per_task * 1000:.0f} ms per task while scanning, "
        f"{idle_cpu * 1000:.1f} ms per second when idle"
    )
    result.notes.append(UPSTREAM)
    worker.stop()
    return result


def _split(commands: list[Command], sent: list[tuple[Sent, Upload]], hostname: str) -> dict[str, list[float]]:
    """Each task's publish-to-upload time cut at the Redis commands that mark its steps."""
    parts: dict[str, list[float]] = {k: [] for k in ("pickup", "start", "nmap1", "between", "nmap2", "tail")}
    for task, upload in sent:
        t = timeline(commands, task.task_id, hostname)
        if t.claimed is None or len(t.pid_set) < 2 or len(t.pid_cleared) < 2:
            continue
        parts["pickup"].append(t.claimed - task.published)
        parts["start"].append(t.pid_set[0] - t.claimed)
        parts["nmap1"].append(t.pid_cleared[0] - t.pid_set[0])
        parts["between"].append(t.pid_set[1] - t.pid_cleared[0])
        parts["nmap2"].append(t.pid_cleared[1] - t.pid_set[1])
        parts["tail"].append(upload.time - t.pid_cleared[1])
    return parts


def _row(label: str, values: list[float], *, unit_ms: bool = False) -> list[str]:
    def fmt(v: float) -> str:
        return ms(v) if unit_ms else f"{v:.3f} s"

    stats = (
        median(values),
        percentile(values, 95),
        min(values, default=float("nan")),
        max(values, default=float("nan")),
    )
    return [label, *(fmt(v) for v in stats)]
