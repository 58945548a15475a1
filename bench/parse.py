"""Time and peak memory of merge.py at 65,535 open ports, next to python-nmap on the same XML.

    .venv/bin/python bench/parse.py [--ports N] [--repeat R]

Generates a phase-1/phase-2 pair with every TCP port open (tests/support/xmlgen.py: phase 2 has a
service with product/version/cpe and three scripts per port, os/hostscript/trace per host), then runs
each measurement in a fresh interpreter so peak RSS belongs to that step alone.

Linux carries ru_maxrss across fork+exec (the parent's high-water mark at the fork), so this parent stays
small (it generates the files in a child too) and each child also reports VmHWM from /proc/self/status,
which starts afresh at exec. Both columns should agree.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tests.support is not installed

CASES = {
    "baseline (interpreter + imports)": "baseline",
    "merge_reports(phase1, phase2)": "merge",
    "summary(merged)": "summary",
    "python-nmap analyse(phase2)": "nmap-phase2",
    "python-nmap analyse(merged)": "nmap-merged",
}


def child(case: str, directory: Path) -> None:
    """One measurement, in this fresh process; prints JSON."""
    import nmap

    from falcoria_worker import merge
    from tests.support import xmlgen

    p1, p2, out = directory / "phase1.xml", directory / "phase2.xml", directory / "merged.xml"
    start = time.perf_counter()
    count = 0
    if case == "generate":
        xmlgen.all_ports_pair(directory, "127.0.0.1", int(os.environ["BENCH_PORTS"]))
    elif case == "merge":
        merge.merge_reports(p1, p2, out, target_ip="127.0.0.1", hostnames=["bench.test"])
    elif case == "summary":
        count = len(merge.summary(out))
    elif case.startswith("nmap-"):
        source = p2 if case == "nmap-phase2" else out
        scan = nmap.PortScanner().analyse_nmap_xml_scan(source.read_text(encoding="utf-8"))
        count = len(scan["scan"]["127.0.0.1"]["tcp"])
    seconds = time.perf_counter() - start
    rusage_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1])  # type: ignore[index]
    print(
        json.dumps(
            {"seconds": seconds, "rusage_mib": rusage_kib / 1024, "hwm_mib": hwm_kib / 1024, "ports": count}
        )
    )


def measure(case: str, directory: Path, ports: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", case, str(directory)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "BENCH_PORTS": str(ports)},
    )
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--ports", type=int, default=65535)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best time is shown")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        measure("generate", directory, args.ports)
        sizes = {name: (directory / name).stat().st_size / 2**20 for name in ("phase1.xml", "phase2.xml")}
        print(f"{args.ports} open TCP ports; phase1 {sizes['phase1.xml']:.1f} MiB,", end=" ")
        print(f"phase2 {sizes['phase2.xml']:.1f} MiB")
        print(f"{'step':36} {'best s':>7} {'maxrss MiB':>11} {'VmHWM MiB':>10} {'ports':>6}")
        for label, case in CASES.items():
            runs = [measure(case, directory, args.ports) for _ in range(args.repeat)]
            best = min(run["seconds"] for run in runs)
            rusage = max(run["rusage_mib"] for run in runs)
            hwm = max(run["hwm_mib"] for run in runs)
            print(f"{label:36} {best:7.2f} {rusage:11.1f} {hwm:10.1f} {int(runs[0]['ports']):>6}")
        merged = directory / "merged.xml"
        print(f"merged report {merged.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
