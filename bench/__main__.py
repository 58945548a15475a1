"""`python -m bench [--quick] [--no-record] [options] [NAME...]`: run benchmarks in one lab.

Each prints its figures; unless --no-record, all results are appended to docs/benchmarks.md in one
dated section, and figures (the sweep's) are written next to it; the soak goes to docs/reliability.md
instead. Without a NAME all run but the sweep (up to 45 minutes) and the soak (an hour), which run only
when named. SIGTERM and Ctrl-C stop the run and still tear
the lab down (services, namespaces, workers, nmap).
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable

from bench import cancel, idle, large, observers, overhead, parse_bench, scaling, soak, sweep, tracking
from bench.lab import Lab, load_average
from bench.report import RELIABILITY, RESULTS, Options, Result, append, header

BENCHMARKS: dict[str, Callable[[Lab, Options], Result]] = {
    "overhead": lambda lab, o: overhead.run(lab, o.quick, o.settings),
    "large": lambda lab, o: large.run(lab, o.quick),
    "cancel": lambda lab, o: cancel.run(lab, o.quick),
    "scaling": lambda lab, o: scaling.run(lab, o.quick),
    "parse": lambda lab, o: parse_bench.run(lab, o.quick),
    "idle": idle.run,
    "tracking": tracking.run,
    "sweep": sweep.run,
    "observers": lambda lab, o: observers.run(lab, o.quick),
    "soak": soak.run,
}
ONLY_WHEN_NAMED = {"sweep", "soak"}
RECORDED_IN = {"soak": RELIABILITY}  # any other result goes to RESULTS


def _instances(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(1 <= n <= 64 for n in counts):
        raise argparse.ArgumentTypeError("instance counts are 1..64")
    return counts


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through Lab.__exit__, which stops everything it started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)} (default all)"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke version of each benchmark")
    parser.add_argument("--no-record", action="store_true", help="print only: append nothing to docs/")
    parser.add_argument("--addresses", type=int, help="sweep: addresses per round (1..1024)")
    parser.add_argument("--instances", type=_instances, default=(), help="sweep: instance counts, e.g. 1,2")
    parser.add_argument(
        "--seconds",
        type=float,
        help="idle: length of the sample (default 60); soak: length of the run (default 3600)",
    )
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="overhead, idle, tracking: a worker setting (repeatable)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.addresses is not None and not 1 <= args.addresses <= 1024:
        parser.error("--addresses is 1..1024 (one /22)")
    names = args.names or [n for n in BENCHMARKS if n not in ONLY_WHEN_NAMED]
    options = Options(
        quick=args.quick,
        addresses=args.addresses,
        instances=args.instances,
        seconds=args.seconds,
        plot_dir=None if args.no_record else RESULTS.parent,
        settings=dict(args.set),
    )
    signal.signal(signal.SIGTERM, _stop)
    head = header()
    print(head, flush=True)
    results: list[Result] = []
    failed = 0
    with Lab() as lab:
        for name in names:
            try:
                result = BENCHMARKS[name](lab, options)
            except Exception:
                failed += 1
                traceback.print_exc()
                result = Result(
                    name,
                    f"{name}: FAILED",
                    args.quick,
                    notes=[traceback.format_exc(limit=1).strip().splitlines()[-1]],
                )
            result.notes.append(f"load average at the end: {load_average()} (1/5/15 min)")
            print(result.terminal(), "\n", flush=True)
            results.append(result)
            lab.reset()
    if not args.no_record:
        for path in {RECORDED_IN.get(r.name, RESULTS) for r in results}:
            append([r for r in results if RECORDED_IN.get(r.name, RESULTS) == path], head, path)
            print(f"appended to {path.relative_to(RESULTS.parents[1])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
