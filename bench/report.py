"""Figures: percentiles, a plain-text table for the terminal, and the entry appended to docs/benchmarks.md."""

from __future__ import annotations

import datetime
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.lab import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "benchmarks.md"
RELIABILITY = ROOT / "docs" / "reliability.md"  # where the soak is recorded, next to the fault cases


@dataclass(frozen=True)
class Options:
    """What `scripts/bench` was asked for, as far as a benchmark looks at it."""

    quick: bool = False
    addresses: int | None = None  # sweep: addresses per round (default: by instance count)
    instances: tuple[int, ...] = ()  # sweep: instance counts (default 1, 2, 4, 8)
    seconds: float | None = None  # idle: length of the sample; soak: length of the run
    plot_dir: Path | None = None  # where figures go (docs/ when the run is recorded), None: no figures
    settings: dict[str, str] = field(default_factory=dict)  # extra worker settings (idle, tracking)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100): with 50 samples p99 is the largest, never interpolated."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


@dataclass
class Result:
    """One benchmark's outcome: a table of figures, the goals with their verdicts, and notes."""

    name: str
    title: str
    quick: bool = False
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    goals: list[tuple[str, str, bool | None]] = field(default_factory=list)  # (goal, measured, met?)
    notes: list[str] = field(default_factory=list)
    raw: str = ""  # preformatted output (bench/parse.py's table)

    def goal(self, text: str, measured: str, met: bool | None) -> None:
        self.goals.append((text, measured, met))

    def table(self) -> str:
        widths = [max(len(str(c)) for c in col) for col in zip(self.headers, *self.rows, strict=False)]
        lines = [
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False))
            for row in [self.headers, *self.rows]
        ]
        return "\n".join(lines)

    def terminal(self) -> str:
        out = [f"== {self.title}{' (quick)' if self.quick else ''}"]
        if self.rows:
            out.append(self.table())
        if self.raw:
            out.append(self.raw.rstrip())
        for text, measured, met in self.goals:
            verdict = {True: "MET", False: "NOT MET", None: "n/a"}[met]
            out.append(f"goal: {text}: {measured} -> {verdict}")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    def markdown(self) -> str:
        out = [f"### {self.title}{' (quick mode)' if self.quick else ''}", ""]
        if self.rows:
            out.append("| " + " | ".join(self.headers) + " |")
            out.append("|" + "---|" * len(self.headers))
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in self.rows)
            out.append("")
        if self.raw:
            out.extend(["```", self.raw.rstrip(), "```", ""])
        if self.goals:
            out.append("| goal | measured | verdict |")
            out.append("|---|---|---|")
            for text, measured, met in self.goals:
                verdict = {True: "met", False: "**not met**", None: "n/a"}[met]
                out.append(f"| {text} | {measured} | {verdict} |")
            out.append("")
        out.extend(f"- {n}" for n in self.notes)
        if self.notes:
            out.append("")
        return "\n".join(out)


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "falcoria_worker")
    return f"{sha}{' + uncommitted changes in falcoria_worker/' if dirty else ''}"


def header() -> str:
    m = machine()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"## {now}, commit {_commit()}\n\n"
        f"{m['cores']} cores ({m['cpu']}), {m['memory']} memory ({m['available']} available), "
        f"kernel {m['kernel']}, nmap {m['nmap']}; load average {m['load']} (1/5/15 min) at the start\n"
    )


def append(results: Sequence[Result], head: str, path: Path = RESULTS) -> None:
    """Append one section with every result of this run to `path` (docs/benchmarks.md unless a result
    belongs elsewhere), under `head` (header() taken when the run started: the commit measured, not
    whatever HEAD is by the end)."""
    if not path.exists():
        path.write_text(INTRO)
    text = "\n" + head + "\n" + "\n".join(r.markdown() for r in results)
    with path.open("a", encoding="utf-8") as out:
        out.write(text)


INTRO = """# Benchmarks

Produced by `scripts/bench` (all benchmarks but the sweep) or `scripts/bench NAME...` (`overhead`,
`large`, `cancel`, `scaling`, `parse`, `idle`, `tracking`, `sweep`); `--quick` runs a smaller smoke
version. The sweep (up to 45 minutes) runs only when named: `scripts/bench sweep` scans 256 addresses per
instance (at most the whole /22 of 1,024) with 1, 2, 4 and 8 instances; `--instances 1,2` and
`--addresses 128` make it smaller. `scripts/bench idle --seconds S` sets the idle sample's length, and
`--set KEY=VALUE` passes a worker setting to the idle and tracking benchmarks. Each run appends a dated
section below with the commit, the machine and its load average, and writes the sweep's figures
(`bench-<time>-sweep-*.png`) next to this file. Everything runs locally: real Redis and RabbitMQ on
private ports, the fake ScanLedger in the benchmark process, and scan targets in network namespaces the
benchmark creates (tests/support/netns.py). The code is in `bench/`; how each figure is taken is
described in its module's docstring. Results from different machines or from runs that shared the CPU
with other work are not comparable; the "notes" lines say what else ran.
"""
