"""`python -m bench [--quick] [--no-record] [NAME...]`: run benchmarks (all by default) in one lab.

Each prints its figures; unless --no-record, all results are appended to docs/benchmarks.md in one
dated section. SIGTERM and Ctrl-C stop the run and still tear the lab down (services, namespaces,
workers, nmap).
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable

from bench import cancel, large, observers, overhead, parse_bench, scaling
from bench.lab import Lab
from bench.report import Result, append, header

BENCHMARKS: dict[str, Callable[[Lab, bool], Result]] = {
    "overhead": overhead.run,
    "large": large.run,
    "cancel": cancel.run,
    "scaling": scaling.run,
    "parse": parse_bench.run,
    "observers": observers.run,
}


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through Lab.__exit__, which stops everything it started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)} (default all)"
    )
    parser.add_argument("--quick", action="store_true", help="small smoke version of each benchmark")
    parser.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    signal.signal(signal.SIGTERM, _stop)
    head = header()
    print(head, flush=True)
    results: list[Result] = []
    failed = 0
    with Lab() as lab:
        for name in names:
            try:
                result = BENCHMARKS[name](lab, args.quick)
            except Exception:
                failed += 1
                traceback.print_exc()
                result = Result(
                    name,
                    f"{name}: FAILED",
                    args.quick,
                    notes=[traceback.format_exc(limit=1).strip().splitlines()[-1]],
                )
            print(result.terminal(), "\n", flush=True)
            results.append(result)
            lab.reset()
    if not args.no_record:
        append(results, head)
        print("appended to docs/benchmarks.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
