"""Scaling: network-bound tasks on 1, 2, 4 and 8 worker instances of one host.

Each task scans 20 ports of the blackhole host, which drops every probe, so nmap spends the task waiting
on its timeouts (little CPU): what limits throughput is how well instances share the queue, not the CPU.
For each instance count N, N instances start (READY), then 4*N tasks are published at once; throughput is
tasks / (last upload - first publish). Efficiency is throughput(N) / (N * throughput(1)): 100% is linear.
"""

from __future__ import annotations

from bench import bare
from bench.lab import Lab
from bench.report import Result

PORTS_OPTS = "-n -Pn --max-retries 2 --initial-rtt-timeout 1000ms -p 1-20"
INSTANCES, QUICK_INSTANCES = (1, 2, 4, 8), (1, 2)
TASKS_PER_INSTANCE, QUICK_TASKS_PER_INSTANCE = 4, 2
GOAL = 0.90


def run(lab: Lab, quick: bool) -> Result:
    counts = QUICK_INSTANCES if quick else INSTANCES
    per = QUICK_TASKS_PER_INSTANCE if quick else TASKS_PER_INSTANCE
    base = bare.run_bare(lab.targets.blackhole, PORTS_OPTS)
    result = Result("scaling", f"Scaling: network-bound tasks (bare nmap {base.total:.2f} s each)", quick)
    result.headers = [
        "instances",
        "tasks",
        "wall",
        "tasks/min",
        "linear tasks/min",
        "efficiency",
        "ideal from bare nmap",
    ]
    single: float | None = None
    worst = 1.0
    for n in counts:
        for i in range(n):
            lab.worker(f"s{i + 1}")
        sent = [lab.send(lab.targets.blackhole, PORTS_OPTS) for _ in range(n * per)]
        uploads = [lab.upload_of(task, timeout=600) for task in sent]
        wall = max(u.time for u in uploads) - min(t.published for t in sent)
        rate = len(sent) / wall * 60
        single = single or rate
        efficiency = rate / (n * single)
        worst = min(worst, efficiency)
        result.rows.append(
            [
                str(n),
                str(len(sent)),
                f"{wall:.2f} s",
                f"{rate:.1f}",
                f"{n * single:.1f}",
                f"{efficiency:.1%}",
                f"{n * 60 / base.total:.1f}",
            ]
        )
        lab.stop_workers()
    result.goal(
        f"efficiency >= {GOAL:.0%} of linear up to {counts[-1]} instances on this host",
        f"worst {worst:.1%}",
        worst >= GOAL,
    )
    return result
