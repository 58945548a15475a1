"""Large outputs: 5,000 and 65,535 open ports (the lab's allopen host, which answers on every TCP port
with an SSH banner), -sV in phase 2, against the same nmap commands run bare.

Each case gets a fresh worker process, so its VmHWM (peak RSS, /proc/<pid>/status) belongs to that task
alone; nmap's own memory is not the worker's and is not counted. Publish-to-upload includes the fake
ScanLedger parsing the report before it answers 200 (seconds at 65,535 ports); that time, measured on the
same bytes afterwards, is shown and taken out of the second ratio, since a real ScanLedger's import time
is not the worker's either.
"""

from __future__ import annotations

import time

from bench import bare, procstat
from bench.lab import Lab
from bench.report import Result, median
from tests.fakes.scanledger import check_report

# (label, phase-1 options, phase 2 or not, alternating bare/worker pairs: medians are compared)
FULL = [
    ("5,000 open ports, -sV", "-n -Pn -p 1-5000", True, 3),
    ("65,535 open ports, -sV", "-n -Pn -p-", True, 1),
]
QUICK = [
    ("1,000 open ports, -sV", "-n -Pn -p 1-1000", True, 1),
    ("65,535 open ports, phase 1 only", "-n -Pn -p-", False, 1),
]
SERVICE_OPTS = "-sV -Pn"
RSS_GOAL_MIB = 150


def run(lab: Lab, quick: bool) -> Result:
    result = Result("large", "Large outputs: open ports by the thousand, -sV", quick)
    result.headers = [
        "case",
        "pairs",
        "bare nmap",
        "worker publish-to-upload",
        "fake's parse",
        "ratio",
        "ratio without the fake's parse",
        "worker peak RSS",
        "worker RSS idle",
        "report",
    ]
    for number, (label, ports_opts, services, pairs) in enumerate(QUICK if quick else FULL):
        worker = lab.worker(f"large{number}")
        idle = procstat.memory_kib(worker.pid)["VmRSS"] / 1024
        bares: list[float] = []
        e2es: list[float] = []
        for _ in range(pairs):
            base = bare.run_bare(lab.targets.allopen, ports_opts, SERVICE_OPTS, services=services)
            bares.append(base.total)
            task = lab.send(lab.targets.allopen, ports_opts, SERVICE_OPTS, include_services=services)
            upload = lab.upload_of(task, timeout=3600)
            e2es.append(upload.time - task.published)
        peak = procstat.memory_kib(worker.pid)["VmHWM"] / 1024
        started = time.perf_counter()
        check_report(upload.xml)
        parse = time.perf_counter() - started
        ports = upload.xml.count(b'<state state="open"')
        e2e, bare_total = median(e2es), median(bares)
        ratio, net_ratio = e2e / bare_total, (e2e - parse) / bare_total
        result.rows.append(
            [
                label,
                str(pairs),
                f"{bare_total:.2f} s",
                f"{e2e:.2f} s",
                f"{parse:.2f} s",
                f"{ratio:.3f}",
                f"{net_ratio:.3f}",
                f"{peak:.1f} MiB",
                f"{idle:.1f} MiB",
                f"{len(upload.xml) / 2**20:.1f} MiB, {ports} open",
            ]
        )
        result.goal(
            f"{label}: completes, every port in the report",
            f"{ports} of {base.open_ports}",
            ports == base.open_ports,
        )
        result.goal(
            f"{label}: ratio to bare nmap <= 1.1 (without the fake's parse)",
            f"{net_ratio:.3f}",
            net_ratio <= 1.1,
        )
        result.goal(f"{label}: worker peak RSS <= {RSS_GOAL_MIB} MB", f"{peak:.1f} MiB", peak <= RSS_GOAL_MIB)
        worker.stop()
        lab.stop_workers()
    result.notes.append(
        "upstream worker: blocks on its stdout pipe from about 930 open ports, uploads nothing"
    )
    return result
