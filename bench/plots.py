"""PNG figures for docs/benchmarks.md (matplotlib, from the `bench` extra; nothing else imports it).

File names carry the time of the run, so a later run adds figures and never replaces those an earlier
section of docs/benchmarks.md shows.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from bench.sweep import Round


def sweep(rounds: Sequence[Round], directory: Path) -> dict[str, Path]:
    """Throughput against the instance count, and the distribution of publish-to-upload latency."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "throughput against instances": directory / f"bench-{stamp}-sweep-throughput.png",
        "publish-to-upload latency": directory / f"bench-{stamp}-sweep-latency.png",
    }
    counts = [r.instances for r in rounds]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [r.rate for r in rounds], marker="o", label="falcoria-worker")
    ax.plot(counts, [r.bare_rate for r in rounds], marker="s", linestyle="--", label="bare nmap (xargs -P N)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("instances (parallel nmap runs for bare nmap)")
    ax.set_ylabel("addresses per minute")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Sweep throughput, two phases with -sV per address")
    fig.tight_layout()
    fig.savefig(paths["throughput against instances"], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rounds:
        ordered = sorted(r.latencies)
        share = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, share, where="post", label=f"N={r.instances} ({r.addresses} addresses)")
    ax.set_xlabel("publish to upload, seconds (includes the wait in the queue)")
    ax.set_ylabel("share of tasks")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Task latency over a sweep (all tasks published at once)")
    fig.tight_layout()
    fig.savefig(paths["publish-to-upload latency"], dpi=100)
    plt.close(fig)
    return paths
