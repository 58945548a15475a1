"""Parsing: runs bench/parse.py (merge and summary of a 65,535-open-ports report against python-nmap on
the same XML, each step in a fresh interpreter) and records its table. It needs no lab service."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.lab import Lab
from bench.report import Result

SCRIPT = Path(__file__).with_name("parse.py")


def run(_lab: Lab, quick: bool) -> Result:
    args = ["--ports", "5000", "--repeat", "1"] if quick else ["--ports", "65535", "--repeat", "3"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True)
    result = Result("parse", "Parsing: merge and serialise vs python-nmap (bench/parse.py)", quick)
    result.raw = done.stdout
    rows = {
        m[1].strip(): (float(m[2]), float(m[4]))
        for m in re.finditer(r"^(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", done.stdout, re.M)
    }
    merge, nmap = rows.get("merge_reports(phase1, phase2)"), rows.get("python-nmap analyse(phase2)")
    if merge and nmap:
        result.goal(
            "merge time vs python-nmap parse of phase 2", f"{merge[0]:.2f} s vs {nmap[0]:.2f} s", None
        )
        result.goal("merge peak memory vs python-nmap", f"{merge[1]:.0f} MiB vs {nmap[1]:.0f} MiB", None)
    return result
