"""Tracking wait: Redis commands the worker sends per task, by how late Tasker writes its tracking keys.

The real Tasker publishes first and writes the task's metadata and sets afterwards; the worker must not
clean up before those writes land, so it waits for them at the start of a scan. Here Tasker's writes
follow the publish by 0, 1 and 2.5 s (tests/support/tasker.py `track_delay`), one task at a time against
the lab's services host (FTP and SSH banners, both phases). Redis MONITOR records every command; a
command is the worker's when it came from any connection but the benchmark's own (named by CLIENT
SETNAME) or from a script the worker ran, and it is the task's when it names the task's id or its
project (each task has a project of its own; Tasker's lock key names the project, not the task). If the
wait is driven by events or growing timers, the count does not grow with the delay.
"""

from __future__ import annotations

import time

from bench.lab import BENCH_CLIENT, Lab, Sent
from bench.monitor import Command, Monitor
from bench.report import Options, Result, median

PORTS_OPTS = "-n -Pn --max-retries 1 -p 21,22"
SERVICE_OPTS = "-sV -Pn"
DELAYS = (0.0, 1.0, 2.5)
TASKS, QUICK_TASKS = 5, 1
GROWTH_GOAL = 1.10  # commands per task at the longest delay / at none


def run(lab: Lab, options: Options) -> Result:
    count = QUICK_TASKS if options.quick else TASKS
    ip = lab.targets.services
    lab.worker("1", **options.settings)
    lab.upload_of(lab.send(ip, PORTS_OPTS, SERVICE_OPTS), timeout=120)  # warm-up, not counted
    runs: list[tuple[float, Sent, float]] = []
    with Monitor(lab.redis.client(socket_timeout=None)) as mon:
        for delay in DELAYS:
            for _ in range(count):
                task = lab.send(ip, PORTS_OPTS, SERVICE_OPTS, track_delay=delay)
                runs.append((delay, task, lab.upload_of(task, timeout=120).time))
        time.sleep(0.5)  # the delivery mark follows the upload
    ours = {
        c["addr"] for c in lab.redis.client().client_list() if str(c.get("name", "")).startswith(BENCH_CLIENT)
    }
    worker = [c for c in mon.commands if c.client not in ours]

    result = Result(
        "tracking", "Tracking wait: worker's Redis commands per task by Tasker's delay", options.quick
    )
    result.headers = [
        "Tasker's keys after",
        "tasks",
        "commands naming the task (median)",
        "  of them metadata checks",
        "all worker commands, publish to upload",
        "publish to upload",
    ]
    medians = {}
    for delay in DELAYS:
        mine = [(task, uploaded) for d, task, uploaded in runs if d == delay]
        named = [_naming(worker, task) for task, _ in mine]
        medians[delay] = median([float(len(cs)) for cs in named])
        checks = [float(sum(_is_metadata_check(c) for c in cs)) for cs in named]
        window = [float(sum(task.published <= c.time <= uploaded for c in worker)) for task, uploaded in mine]
        result.rows.append(
            [
                f"{delay:g} s",
                str(len(mine)),
                f"{medians[delay]:.0f}",
                f"{median(checks):.0f}",
                f"{median(window):.0f}",
                f"{median([uploaded - task.published for task, uploaded in mine]):.2f} s",
            ]
        )
    growth = medians[DELAYS[-1]] / medians[DELAYS[0]]
    result.goal(
        f"commands per task do not grow with the wait (at {DELAYS[-1]:g} s <= {GROWTH_GOAL:.2f} x at 0 s)",
        f"{growth:.2f} x",
        growth <= GROWTH_GOAL,
    )
    result.notes.append(
        "commands a worker's Lua script ran are counted as well as the EVALSHA that ran them "
        "(MONITOR shows both; Redis' commandstats counts both)"
    )
    return result


def _naming(commands: list[Command], task: Sent) -> list[Command]:
    return [c for c in commands if task.task_id in c.text or task.project in c.text]


def _is_metadata_check(command: Command) -> bool:
    return command.text.upper().startswith(("EXISTS", "HGETALL", "HEXISTS")) and ":metadata:" in command.text
