"""`falcoria-worker spool list|show|retry|drop`: the operator's view of one instance's spool.

The spool belongs to the running worker; this command changes it only by the same single renames the
worker uses (see spool.py), so it is safe while the instance runs. A retried entry is delivered on the
worker's next look at the spool (within its rescan interval). Every change that could lose a report
is either refused with the reason or, for `drop`, confirmed first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from falcoria_worker.config import Settings
from falcoria_worker.spool import Held, Spool, SpoolRefused


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    spool = sub.add_parser("spool", help="list, show, retry or drop reports waiting for ScanLedger")
    verbs = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    listing = verbs.add_parser("list", parents=[common], help="pending and failed reports")
    listing.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    show = verbs.add_parser("show", parents=[common], help="one entry in full")
    show.add_argument("name", help="entry name from `spool list` (task id, or task id+N)")
    retry = verbs.add_parser("retry", parents=[common], help="send failed reports to ScanLedger again")
    retry.add_argument("names", nargs="*", metavar="NAME", help="failed entries to re-drive")
    retry.add_argument("--all", action="store_true", help="every failed entry")
    drop = verbs.add_parser("drop", parents=[common], help="delete reports for good")
    drop.add_argument("names", nargs="*", metavar="NAME", help="entries to delete")
    drop.add_argument("--all-failed", action="store_true", help="every failed entry")
    drop.add_argument("--pending", action="store_true", help="also drop pending (undelivered) entries")
    drop.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def main(args: argparse.Namespace, settings: Settings) -> int:
    try:
        spool = Spool(Path(settings.state_dir) / "spool", owner=False)
    except FileNotFoundError as exc:
        print(f"falcoria-worker spool: {exc}", file=sys.stderr)
        return 1
    command: Callable[[argparse.Namespace, Spool], int] = {
        "list": _list,
        "show": _show,
        "retry": _retry,
        "drop": _drop,
    }[args.spool_command]
    try:
        return command(args, spool)
    except PermissionError as exc:
        print(f"falcoria-worker spool: {exc} (run as root or as the service user)", file=sys.stderr)
        return 1


def as_dict(held: Held) -> dict[str, object]:
    entry = held.entry
    return {
        "state": held.state,
        "name": held.name,
        "task_id": entry.task_id if entry else None,
        "project": entry.project if entry else None,
        "mode": entry.mode if entry else None,
        "track_history": entry.track_history if entry else None,
        "created": entry.created if entry else None,
        "report": str(entry.xml) if entry else None,
        "size": held.size,
        "reason": held.reason,
        "problem": held.problem,
    }


def _when(held: Held) -> str:
    if held.entry is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.entry.created))


def _list(args: argparse.Namespace, spool: Spool) -> int:
    entries = spool.held()
    if args.json:
        print(json.dumps({"spool": str(spool.root), "entries": [as_dict(h) for h in entries]}, indent=2))
        return 0
    if not entries:
        print(f"spool {spool.root}: empty")
        return 0
    rows = [("STATE", "NAME", "CREATED", "MODE", "BYTES", "REASON")]
    for held in entries:
        why = held.problem or held.reason or ""
        mode = held.entry.mode if held.entry else "?"
        rows.append(
            (held.state, held.name, _when(held), mode, str(held.size), why.splitlines()[0] if why else "")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(col.ljust(w) for col, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _show(args: argparse.Namespace, spool: Spool) -> int:
    try:
        held = spool.find(args.name)
    except SpoolRefused as exc:
        print(exc, file=sys.stderr)
        return 1
    for key, value in as_dict(held).items():
        if value is not None:
            print(f"{key + ':':<15}{_when(held) if key == 'created' else value}")
    return 0


def _names(args: argparse.Namespace, spool: Spool, every: bool, flag: str) -> list[str] | None:
    if every and args.names:
        print(f"give entry names or {flag}, not both", file=sys.stderr)
        return None
    if every:
        return [h.name for h in spool.held() if h.state == "failed"]
    if not args.names:
        print(f"name the entries (see `falcoria-worker spool list`) or give {flag}", file=sys.stderr)
        return None
    return list(args.names)


def _retry(args: argparse.Namespace, spool: Spool) -> int:
    names = _names(args, spool, args.all, "--all")
    if names is None:
        return 2
    refused = 0
    for name in names:
        try:
            entry = spool.requeue(name)
        except SpoolRefused as exc:
            refused += 1
            print(f"refused: {exc}", file=sys.stderr)
            continue
        print(f"{name}: pending again as {entry.task_id}; the worker delivers it on its next pass")
    return 1 if refused else 0


def _confirm(what: Sequence[str]) -> bool:
    if not sys.stdin.isatty():
        print("not dropped: no terminal to confirm on; give --yes", file=sys.stderr)
        return False
    answer = input(f"Delete {len(what)} report(s) for good ({', '.join(what)})? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _drop(args: argparse.Namespace, spool: Spool) -> int:
    names = _names(args, spool, args.all_failed, "--all-failed")
    if names is None:
        return 2
    try:
        found = [spool.find(name) for name in names]
    except SpoolRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    pending = [h.name for h in found if h.state == "pending"]
    if pending and not args.pending:
        print(
            f"refused: {', '.join(pending)} pending, not failed: reports ScanLedger has not seen yet; "
            "give --pending to drop them anyway",
            file=sys.stderr,
        )
        return 1
    if not found:
        print("nothing to drop")
        return 0
    if not args.yes and not _confirm([h.name for h in found]):
        return 1
    refused = 0
    for held in found:
        try:
            spool.drop(held.name, pending=args.pending)
        except SpoolRefused as exc:  # gone or moved since it was listed (delivered meanwhile)
            refused += 1
            print(f"refused: {exc}", file=sys.stderr)
            continue
        print(f"{held.name}: dropped ({held.state}, {held.size} bytes)")
    return 1 if refused else 0
