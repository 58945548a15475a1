"""What /proc says about a running process: CPU time, context switches, memory.

Read from outside, so the worker is measured as it runs, with nothing added to it. CPU times are the
process's own threads (live and exited: the kernel folds an exited thread's time into its process) or,
separately, the children it has reaped (nmap). Context switches are kept per thread only, so they are
summed over /proc/<pid>/task/*: a thread that exits between two samples takes its count with it. CPU
time comes in clock ticks (10 ms; this kernel has no per-thread schedstat).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # comm (field 2) may contain spaces and parentheses; the fields after the last ')' are fixed.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process: all its threads, not its children."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / TICK


def children_cpu_seconds(pid: int) -> float:
    """cutime + cstime: the children the process has waited for (the worker's nmap runs)."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / TICK


@dataclass(frozen=True)
class Threads:
    """Context switches per live thread (by TID), from /proc/<pid>/task/*/status."""

    voluntary: dict[int, int]
    nonvoluntary: dict[int, int]

    def since(self, earlier: Threads) -> dict[str, int]:
        """Totals over the threads alive now, minus what each had at `earlier` (0 for a new thread)."""

        def delta(now: dict[int, int], then: dict[int, int]) -> int:
            return sum(value - then.get(tid, 0) for tid, value in now.items())

        return {
            "voluntary": delta(self.voluntary, earlier.voluntary),
            "nonvoluntary": delta(self.nonvoluntary, earlier.nonvoluntary),
        }


def threads(pid: int) -> Threads:
    """A voluntary switch is a thread going to sleep, so each is followed by one wake-up: their count is
    the number of times the process woke up."""
    voluntary, nonvoluntary = {}, {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread exited while we listed them
        tid = int(task.name)
        voluntary[tid] = int(_field(status, "voluntary_ctxt_switches"))
        nonvoluntary[tid] = int(_field(status, "nonvoluntary_ctxt_switches"))
    return Threads(voluntary, nonvoluntary)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak resident set since the process started), in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {name: int(_field(text, name).split()[0]) for name in ("VmRSS", "VmHWM")}


def _field(status: str, name: str) -> str:
    match = re.search(rf"^{name}:\s*(.+)$", status, flags=re.M)
    if match is None:
        raise ValueError(f"no {name} in /proc status")
    return match[1].strip()


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def resources(pid: int) -> dict[str, int]:
    """What a long run watches for leaks: resident memory (KiB), open file descriptors and threads."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {
        "rss": int(_field(status, "VmRSS").split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(_field(status, "Threads")),
    }
