"""Idle: what one instance costs while it has nothing to do, and how long it takes to start.

Start-up runs from the spawn of `falcoria-worker run` (what `systemctl start` does for a Type=notify
unit) to the READY=1 datagram on the notify socket the lab provides in systemd's place
(tests/support/workerproc.py); the instance is started several times and stopped in between, with the
broker and Redis up. The last one is left alone for a few seconds, so that start-up work is over, and
then sampled over the window (60 s by default): CPU time of all its threads from /proc/<pid>/stat (in
clock ticks: 10 ms, so 0.017% of a core over 60 s), context switches summed over /proc/<pid>/task/*
(voluntary ones are sleeps, so each is one wake-up; involuntary ones are preemptions), and the resident
set. The lab's workers send task events and write the metrics textfile (bench/lab.py); settings given
with `--set KEY=VALUE` apply on top.
"""

from __future__ import annotations

import time

from bench import procstat
from bench.lab import Lab
from bench.report import Options, Result, median

SECONDS, QUICK_SECONDS = 60.0, 10.0
STARTS, QUICK_STARTS = 5, 1
SETTLE = 5.0  # seconds after READY before the window opens
CPU_GOAL = 0.05  # percent of one core
WAKEUP_GOAL = 2.0  # per second, all threads
STARTUP_GOAL = 1.0  # seconds
RSS_GOAL_MIB = 55
UPSTREAM = "upstream worker (3 Celery processes), same harness: 0.22% of a core, 7 wake-ups/s, 352 MiB"


def run(lab: Lab, options: Options) -> Result:
    seconds = options.seconds or (QUICK_SECONDS if options.quick else SECONDS)
    starts = QUICK_STARTS if options.quick else STARTS
    worker = None
    startup: list[float] = []
    for _ in range(starts):
        began = time.monotonic()
        if worker is None:
            worker = lab.worker("idle", wait_ready=False, **options.settings)
        else:
            worker.start(wait_ready=False)
        worker.wait_ready()
        ready = next(t for t, line in list(worker.notify.messages) if line == "READY=1")
        startup.append(ready - began)
        if len(startup) < starts:
            worker.stop()
    assert worker is not None

    time.sleep(SETTLE)
    cpu0, threads0 = procstat.cpu_seconds(worker.pid), procstat.threads(worker.pid)
    time.sleep(seconds)
    cpu1, threads1 = procstat.cpu_seconds(worker.pid), procstat.threads(worker.pid)
    memory = procstat.memory_kib(worker.pid)
    switches = threads1.since(threads0)
    # From whole clock ticks (procstat.TICK per second): the float difference of two tick counts can land
    # a hair above a goal the sample meets exactly (3 ticks in 60 s is 0.05%, not 0.0500000001%).
    ticks = round((cpu1 - cpu0) * procstat.TICK)
    cpu_percent = ticks * 100 / (procstat.TICK * seconds)
    wakeups = (switches["voluntary"] + switches["nonvoluntary"]) / seconds
    worker.stop()

    result = Result(
        "idle", f"Idle: one instance, {seconds:.0f} s with the broker and Redis up", options.quick
    )
    result.headers = ["figure", "value"]
    result.rows = [
        ["CPU, % of one core", f"{cpu_percent:.3f}% ({(cpu1 - cpu0) * 1000:.0f} ms in {seconds:.0f} s)"],
        ["wake-ups per second (context switches, all threads)", f"{wakeups:.1f}"],
        ["  voluntary (sleeps) per second", f"{switches['voluntary'] / seconds:.1f}"],
        ["  involuntary (preempted) per second", f"{switches['nonvoluntary'] / seconds:.1f}"],
        ["threads", f"{len(threads0.voluntary)} at the start, {len(threads1.voluntary)} at the end"],
        ["resident memory (VmRSS)", procstat.mib(memory["VmRSS"])],
        ["peak resident memory (VmHWM)", procstat.mib(memory["VmHWM"])],
        [
            f"start-up: spawn -> READY=1 (median of {starts})",
            f"{median(startup):.3f} s (min {min(startup):.3f}, max {max(startup):.3f})",
        ],
    ]
    result.goal(f"CPU <= {CPU_GOAL}% of a core", f"{cpu_percent:.3f}%", cpu_percent <= CPU_GOAL)
    result.goal(f"<= {WAKEUP_GOAL:.0f} wake-ups per second", f"{wakeups:.1f}", wakeups <= WAKEUP_GOAL)
    result.goal(
        f"start-up to READY < {STARTUP_GOAL:.0f} s",
        f"{median(startup):.3f} s",
        median(startup) < STARTUP_GOAL,
    )
    rss = memory["VmRSS"] / 1024
    result.goal(f"RSS <= {RSS_GOAL_MIB} MiB", f"{rss:.1f} MiB", rss <= RSS_GOAL_MIB)
    if options.settings:
        result.notes.append("worker settings: " + ", ".join(f"{k}={v}" for k, v in options.settings.items()))
    result.notes.append(UPSTREAM)
    return result
