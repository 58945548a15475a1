"""Command line: the only place that loads settings and wires the edges together."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from falcoria_worker import __version__, caps, spoolctl
from falcoria_worker.config import Settings, ca_bundle, secret_values
from falcoria_worker.errors import Cancelled, ConfigError, Rejected, ScanFailed, WorkerError
from falcoria_worker.model import Phase, parse_task
from falcoria_worker.pipeline import Engine
from falcoria_worker.policy import PolicyConfig
from falcoria_worker.scope import Scope
from falcoria_worker.settings_io import describe, load

if TYPE_CHECKING:
    from falcoria_worker.ledger import ScanLedger

log = logging.getLogger("falcoria_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falcoria-worker",
        description="Falcoria scan worker: two-phase nmap scans for Tasker, results to ScanLedger.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--instance", help="instance name (the N of falcoria-worker@N)")
    common.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="extra KEY=VALUE file, above /etc/falcoria-worker/worker.conf",
    )
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (highest precedence)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="consume Tasker's queue (what the systemd unit runs)")

    scan = sub.add_parser("scan", parents=[common], help="scan one target now, without a broker")
    scan.add_argument("target", help="IPv4 or IPv6 address")
    scan.add_argument("-p", "--ports", help="ports for phase 1 (replaces --top-ports of the default options)")
    scan.add_argument("--ports-opts", help="phase-1 nmap options (default: NMAP_OPEN_PORTS_OPTS)")
    scan.add_argument("--service-opts", help="phase-2 nmap options (default: NMAP_SERVICE_OPTS)")
    scan.add_argument("--no-services", action="store_true", help="skip phase 2 (service detection)")
    scan.add_argument("--timeout", type=int, default=600, help="seconds per phase (default 600)")
    scan.add_argument("--hostname", action="append", default=[], help="hostname of the target (repeatable)")
    scan.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="allow this network although the scope would refuse it (e.g. 127.0.0.1/32)",
    )
    scan.add_argument("-o", "--output", type=Path, help="merged XML report (default ./falcoria-<target>.xml)")
    scan.add_argument("--project", help="ScanLedger project id: upload the report there")
    scan.add_argument("--mode", default="append", choices=["insert", "replace", "update", "append"])

    sub.add_parser("check", parents=[common], help="verify config, nmap, raw sockets and the peers")
    sub.add_parser("config", parents=[common], help="print the effective settings (secrets masked)")
    register = sub.add_parser(
        "register-ip", parents=[common], help="write this worker's IP to Redis for Tasker"
    )
    register.add_argument(
        "--forget-host",
        action="store_true",
        help="also delete the bare host's worker:HOSTNAME key (no instance with SOURCE_ADDRESS refreshes it)",
    )
    spoolctl.add_parser(sub, common)
    status = sub.add_parser("status", help="every instance on this host: state, scans, spool, last error")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--runtime-root", type=Path, default=None, help=argparse.SUPPRESS)

    drain = sub.add_parser(
        "drain", parents=[common], help="stop the instance taking new scans; its running scans finish"
    )
    drain.add_argument("--wait", action="store_true", help="return once no scan is left")
    drain.add_argument("--timeout", type=float, help="with --wait: give up after SECONDS (exit 3)")
    drain.add_argument("--resume", action="store_true", help="take new scans again")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":  # reads systemd and the status files only: no settings needed
        return _status(args)
    try:
        overrides = _parse_sets(args.set)
        loaded = load(
            instance=args.instance, overrides=overrides, config_files=[Path(p) for p in args.config]
        )
    except ConfigError as exc:
        print(f"falcoria-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    settings = loaded.settings
    if args.command == "run" and loaded.sources.get("RABBITMQ_HOST") == "default":
        # A freshly installed package must not start a worker aimed at nothing; exit 2 also tells
        # the unit not to restart (RestartPreventExitStatus=2).
        print(
            "falcoria-worker: configuration error: RABBITMQ_HOST: no broker configured; set it in "
            "/etc/falcoria-worker/worker.conf (and the other broker, Redis and ScanLedger settings)",
            file=sys.stderr,
        )
        return 2
    command: Callable[[argparse.Namespace, Settings], int] = {
        "run": _run,
        "scan": _scan,
        "check": _check,
        "config": lambda _a, _s: _config(loaded),
        "register-ip": _register_ip,
        "spool": spoolctl.main,
        "drain": _drain,
    }[args.command]
    _setup_logging(settings, interactive=args.command != "run")
    for warning in loaded.warnings:
        log.warning("%s", warning)
    try:
        return command(args, settings)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


def _parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"'{pair}' is not KEY=VALUE", "write it as --set KEY=VALUE")
        out[key.strip().upper()] = value
    return out


def _setup_logging(settings: Settings, *, interactive: bool) -> None:
    from falcoria_worker.logs import setup_logging

    # Interactive commands talk to a terminal; only `run` writes to the journal when it is there.
    # The identifier matches the unit's SyslogIdentifier=, so `journalctl -t falcoria-worker-1` works.
    setup_logging(
        settings.logger_level,
        instance=settings.instance,
        secrets=secret_values(settings),
        identifier=f"falcoria-worker-{settings.instance}",
        journal=False if interactive else None,
    )


def engine_from(settings: Settings, *, extra_allow: Sequence[str] = ()) -> Engine:
    from falcoria_worker import source

    return Engine(
        nmap=_nmap_path(settings),
        policy=PolicyConfig(
            allowed_scripts=frozenset(settings.nmap_allowed_scripts),
            extra_flags=frozenset(settings.nmap_extra_flags),
        ),
        scope=Scope.from_strings(allow=[*settings.scope_allow, *extra_allow], deny=settings.scope_deny),
        raw=caps.raw_sockets(),
        stats_every=settings.stats_every,
        kill_grace=settings.kill_grace,
        source=source.resolve(settings.source_address) if settings.source_address else None,
    )


def _nmap_path(settings: Settings) -> str:
    found = shutil.which(settings.nmap_path)
    if found is None:
        raise ConfigError(
            "NMAP_PATH",
            f"'{settings.nmap_path}' is not an executable on PATH",
            "install nmap (apt install nmap) or set NMAP_PATH to its full path",
        )
    return found


# ---------------------------------------------------------------------------- scan


class _TerminalHooks:
    def __init__(self) -> None:
        self._last: tuple[Phase, int] | None = None

    def phase(self, phase: Phase, detail: str) -> None:
        print(f"-> {detail}", file=sys.stderr)

    def progress(self, phase: Phase, percent: float) -> None:
        step = (phase, int(percent) // 10)
        if step != self._last:
            self._last = step
            print(f"   {percent:.0f}%", file=sys.stderr)

    def nmap_started(self, phase: Phase, proc: object) -> None:
        pass

    def nmap_finished(self, phase: Phase) -> None:
        pass


def _scan_options(args: argparse.Namespace, settings: Settings) -> str:
    opts = args.ports_opts if args.ports_opts is not None else settings.nmap_open_ports_opts
    if args.ports:
        tokens = opts.split()
        kept: list[str] = []
        skip = False
        for tok in tokens:
            if skip:
                skip = False
                continue
            if tok in ("--top-ports", "-p"):
                skip = True
                continue
            if tok == "-F" or tok.startswith(("-p", "--top-ports=")):
                continue
            kept.append(tok)
        opts = " ".join([*kept, "-p", args.ports])
    return opts


def _scan(args: argparse.Namespace, settings: Settings) -> int:
    from falcoria_worker import merge

    payload = {
        "ip": args.target,
        "hostnames": args.hostname,
        "project": args.project or str(uuid.UUID(int=0)),
        "open_ports_opts": _scan_options(args, settings),
        "service_opts": args.service_opts if args.service_opts is not None else settings.nmap_service_opts,
        "timeout": args.timeout,
        "include_services": not args.no_services,
        "mode": args.mode,
        "user": {"id": str(uuid.UUID(int=0)), "username": "cli"},
        "open_ports_str": args.ports or "",
        "track_history": True,
    }
    try:
        task = parse_task(payload)
        engine = engine_from(settings, extra_allow=args.allow)
        plan = engine.prepare(task)
    except Rejected as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        return 2
    except ScanFailed as exc:
        print(f"cannot scan: {exc}", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="falcoria-scan-"))
    cancel = threading.Event()
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["outcome"] = engine.execute(plan, workdir / "task", cancel, _TerminalHooks())
        except WorkerError as exc:
            result["error"] = exc

    thread = threading.Thread(target=work, name="scan")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        cancel.set()  # the runner stops the nmap group; the thread then ends with Cancelled
        thread.join()
    try:
        error = result.get("error")
        if error is not None:
            print(
                f"scan {'cancelled' if isinstance(error, Cancelled) else 'failed'}: {error}", file=sys.stderr
            )
            return 130 if isinstance(error, Cancelled) else 1
        outcome = result["outcome"]
        for note in outcome.notes:  # type: ignore[attr-defined]
            print(f"note: {note}", file=sys.stderr)
        if outcome.report is None:  # type: ignore[attr-defined]
            return 0
        out = args.output or Path(f"falcoria-{task.ip.replace(':', '_')}.xml")
        shutil.copyfile(outcome.report, out)  # type: ignore[attr-defined]
        print(_table(merge.summary(out)))
        print(f"\nreport: {out}", file=sys.stderr)
        if args.project:
            return _upload(settings, task.project, args.mode, out)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _table(rows: Sequence[object]) -> str:
    header = ("PORT", "STATE", "SERVICE", "PRODUCT", "VERSION")
    lines = [header] + [
        (f"{r.portid}/{r.protocol}", r.state, r.service, r.product, r.version)  # type: ignore[attr-defined]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    return text if rows else text + "\n(no ports listed)"


def ledger_from(settings: Settings) -> ScanLedger:
    from falcoria_worker.ledger import ScanLedger

    return ScanLedger(
        settings.backend_base_url or "",
        settings.worker_backend_token,
        ca_bundle=ca_bundle(settings),
        timeout=settings.scanledger_timeout,
    )


def _upload(settings: Settings, project: str, mode: str, report: Path) -> int:
    from falcoria_worker.errors import DeliveryRejected, Retryable

    if not settings.backend_base_url:
        print("not uploaded: BACKEND_BASE_URL is not set", file=sys.stderr)
        return 1
    try:
        ips = ledger_from(settings).upload(project, mode, True, report)
    except (Retryable, DeliveryRejected) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    print(f"uploaded to ScanLedger project {project}: {', '.join(ips) or 'no IPs changed'}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------- check / config / ip


def _check(_args: argparse.Namespace, settings: Settings) -> int:
    from falcoria_worker.checks import FAIL, run_checks

    failed = 0
    for level, name, detail in run_checks(settings):
        failed += level == FAIL
        print(f"{level:4} {name}: {detail}")
    return 1 if failed else 0


def _config(loaded: object) -> int:
    rows = describe(loaded)  # type: ignore[arg-type]
    width = max(len(key) for key, _value, _source in rows)
    for key, value, source in rows:
        print(f"{key.ljust(width)} = {value}    # {source}")
    return 0


def _register_ip(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from falcoria_worker.redis_store import RedisStore, redis_client
    from falcoria_worker.worker_ip import current_ip

    ip = current_ip(settings)
    if ip is None:
        print("no IP found: set WORKER_IP (there is no default route)", file=sys.stderr)
        return 1
    forget = args.forget_host and settings.machine_hostname != settings.hostname
    if args.forget_host and not forget:
        print(
            "--forget-host: this instance is the bare host (no SOURCE_ADDRESS); its key is kept",
            file=sys.stderr,
        )
        return 1
    try:
        store = RedisStore(redis_client(settings), settings.hostname, status_ttl=settings.status_ttl)
        store.register_ip(ip)
        forgotten = store.forget_worker(settings.machine_hostname) if forget else False
    except redis.RedisError as exc:
        print(f"Redis: {exc}", file=sys.stderr)
        return 1
    print(f"worker:{settings.hostname} ip={ip}")
    if forgotten:
        print(f"worker:{settings.machine_hostname} deleted")
    return 0


def _status(args: argparse.Namespace) -> int:
    import json
    import time

    from falcoria_worker import status

    rows = status.gather(
        status.systemd_units(), status.status_files(args.runtime_root or status.RUNTIME_ROOT)
    )
    print(json.dumps(rows, indent=2, sort_keys=True) if args.json else status.render(rows, time.time()))
    return 0


# ---------------------------------------------------------------------------- run


def _drain(args: argparse.Namespace, settings: Settings) -> int:
    from falcoria_worker import drain

    if args.resume:
        return drain.resume(settings)
    return drain.drain(settings, wait=args.wait, timeout=args.timeout)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import time

    from falcoria_worker import broker
    from falcoria_worker.celery_events import CeleryEvents
    from falcoria_worker.delivery import Deliverer
    from falcoria_worker.identity import Identity
    from falcoria_worker.leases import report_owner
    from falcoria_worker.metrics import Metrics, textfile_dir
    from falcoria_worker.observers import ObserverHub, delivery_reporter
    from falcoria_worker.redis_store import RedisStore, redis_client
    from falcoria_worker.reload import Reloader
    from falcoria_worker.runloop import Worker
    from falcoria_worker.spool import Spool
    from falcoria_worker.status import StatusFile, status_path
    from falcoria_worker.systemd_notify import Notifier

    engine = engine_from(settings)
    raw = caps.raw_sockets()
    log.info(
        "falcoria-worker %s starting as %s@%s; %s",
        __version__,
        settings.node_name,
        settings.hostname,
        caps.describe(),
    )
    if raw is caps.RawSockets.NONE:
        log.warning("no raw sockets: SYN, UDP and OS scans will be refused; grant CAP_NET_RAW")
    store = RedisStore(redis_client(settings), settings.hostname, status_ttl=settings.status_ttl)
    spool = deliverer = None
    hub = ObserverHub()
    if settings.backend_base_url:
        spool = Spool(Path(settings.state_dir) / "spool")
        deliverer = Deliverer(
            spool,
            ledger_from(settings),
            on_result=delivery_reporter(hub, time.time),
            confirm=report_owner(store, Identity.of(settings).owner),
            backoff_max=settings.upload_backoff_max,
        )
    else:
        log.warning("BACKEND_BASE_URL is not set: results stay in %s/results", settings.state_dir)
    status_file = StatusFile(
        status_path(Path(settings.state_dir)), instance=settings.instance, spool=spool, clock=time.time
    )
    hub.add(status_file)
    hub.add_worker(status_file)
    # `systemctl reload`: the same layers as at start, read again.
    reloader = Reloader(
        lambda: load(
            instance=args.instance,
            overrides=_parse_sets(args.set),
            config_files=[Path(p) for p in args.config],
        ),
        engine_from,
        build_ledger=ledger_from,
        deliverer=deliverer,
    )
    signal.signal(signal.SIGHUP, reloader.request)
    # Celery events and the metrics file observe the tasks and the instance, on the loop's clock too.
    events = CeleryEvents(
        lambda: broker.connect(settings),
        Identity.of(settings).nodename,
        task_events=settings.worker_send_task_events,
    )
    observers: list[CeleryEvents | Metrics] = [events]
    directory = textfile_dir(settings.metrics_textfile_dir)
    metrics = None
    if directory is not None:
        metrics = Metrics(
            directory, settings.instance, __version__, spool_counts=spool.counts if spool else None
        )
        metrics.raw_socket_capable(raw is not caps.RawSockets.NONE)
        observers.append(metrics)
    for observer in observers:
        hub.add(observer)
        hub.add_worker(observer)
        hub.add_ticking(observer)
    worker = Worker(
        settings,
        engine=engine,
        store=store,
        notifier=Notifier(),
        spool=spool,
        deliverer=deliverer,
        reloader=reloader,
        hub=hub,
        events=events,
    )
    status = worker.run()
    if metrics is not None:
        metrics.remove()  # a clean stop: node_exporter stops exporting this instance
    return status
