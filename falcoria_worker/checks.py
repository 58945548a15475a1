"""`falcoria-worker check`: one line per prerequisite, each with the reason when it fails."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from falcoria_worker import caps
from falcoria_worker.config import Settings, ca_bundle

Check = tuple[bool, str, str]


def run_checks(settings: Settings) -> Iterator[Check]:
    yield (
        True,
        "config",
        f"loaded (instance {settings.instance}, node {settings.node_name}@{settings.hostname})",
    )
    for name, probe in (
        ("nmap", lambda: _nmap(settings)),
        ("raw sockets", _raw),
        ("source address", lambda: _source(settings)),
        ("state dir", lambda: _state_dir(settings)),
        ("redis", lambda: _redis(settings)),
        ("rabbitmq", lambda: _rabbitmq(settings)),
        ("scanledger", lambda: _scanledger(settings)),
    ):
        yield _guarded(name, probe)


def _guarded(name: str, probe: Callable[[], tuple[bool, str]]) -> Check:
    try:
        ok, detail = probe()
    except Exception as exc:  # a check reports; it never crashes the command
        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ok, name, detail


def _nmap(settings: Settings) -> tuple[bool, str]:
    import nmap  # python-nmap runs `nmap -V` and parses the version for us

    path = shutil.which(settings.nmap_path)
    if path is None:
        return False, f"'{settings.nmap_path}' not found on PATH; apt install nmap or set NMAP_PATH"
    major, minor = nmap.PortScanner(nmap_search_path=(path,)).nmap_version()
    if (major, minor) < (7, 80):
        return False, f"nmap {major}.{minor} at {path} is older than 7.80"
    return True, f"nmap {major}.{minor} at {path}"


def _raw() -> tuple[bool, str]:
    state = caps.raw_sockets()
    return state is not caps.RawSockets.NONE, caps.describe()


def _source(settings: Settings) -> tuple[bool, str]:
    if settings.source_address is None:
        return True, "not set: the kernel chooses the source address"
    from falcoria_worker import source

    return True, source.describe(source.resolve(settings.source_address))


def _state_dir(settings: Settings) -> tuple[bool, str]:
    path = Path(settings.state_dir)
    if not path.is_dir():
        return False, f"{path} does not exist (the unit's StateDirectory= creates it; or set STATE_DIR)"
    if not os.access(path, os.W_OK):
        return False, f"{path} is not writable by uid {os.geteuid()}"
    return True, f"{path} writable"


def _redis(settings: Settings) -> tuple[bool, str]:
    from falcoria_worker.state import redis_client

    redis_client(settings).ping()
    return True, f"{settings.redis_host}:{settings.redis_port} db {settings.redis_db} answers"


def _rabbitmq(settings: Settings) -> tuple[bool, str]:
    from amqp.exceptions import NotFound

    from falcoria_worker import broker

    where = f"{settings.rabbitmq_host}:{settings.rabbitmq_port} vhost {settings.rabbitmq_vhost}"
    with broker.connect(settings) as conn:
        try:
            # passive: a health check must not create Tasker's queue
            _name, messages, consumers = conn.channel().queue_declare(
                settings.nmap_scan_queue_name, passive=True
            )
        except NotFound:
            queue = settings.nmap_scan_queue_name
            return True, f"{where}: connected; {queue} not declared yet (Tasker or `run` will)"
    return (
        True,
        f"{where}: {settings.nmap_scan_queue_name} has {messages} message(s), {consumers} consumer(s)",
    )


def _scanledger(settings: Settings) -> tuple[bool, str]:
    if not settings.backend_base_url:
        return True, f"not configured: results stay in {settings.state_dir}/results"
    from falcoria_worker.ledger import ScanLedger

    ledger = ScanLedger(
        settings.backend_base_url, settings.worker_backend_token, ca_bundle=ca_bundle(settings), timeout=5
    )
    ledger.health()
    ledger.check_token()
    if settings.backend_base_url.startswith("http://"):
        return (
            True,
            f"{settings.backend_base_url} answers; WARNING: plain http, the token travels unencrypted",
        )
    return True, f"{settings.backend_base_url} answers and accepts the token"
