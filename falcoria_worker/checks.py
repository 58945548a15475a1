"""`falcoria-worker check`: one line per prerequisite, each with the reason when it fails.

A line is ok, WARN (`run` works, but the operator should know something) or FAIL (`run` would stop, or
could not do its work); only a FAIL makes the command exit 1."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from falcoria_worker import caps
from falcoria_worker.config import Settings, ca_bundle

OK, WARN, FAIL = "ok", "WARN", "FAIL"
Check = tuple[str, str, str]  # level, name, detail
Probe = Callable[[], tuple[str, str]]


def run_checks(settings: Settings) -> Iterator[Check]:
    yield (
        OK,
        "config",
        f"loaded (instance {settings.instance}, node {settings.node_name}@{settings.hostname})",
    )
    for name, probe in (
        ("nmap", lambda: _nmap(settings)),
        ("raw sockets", _raw),
        ("source address", lambda: _source(settings)),
        ("state dir", lambda: _state_dir(Path(settings.state_dir))),
        ("redis", lambda: _redis(settings)),
        ("rabbitmq", lambda: _rabbitmq(settings)),
        ("scanledger", lambda: _scanledger(settings)),
    ):
        yield _guarded(name, probe)


def _guarded(name: str, probe: Probe) -> Check:
    try:
        level, detail = probe()
    except Exception as exc:  # a check reports; it never crashes the command
        level, detail = FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return level, name, detail


def _nmap(settings: Settings) -> tuple[str, str]:
    import nmap  # python-nmap runs `nmap -V` and parses the version for us

    path = shutil.which(settings.nmap_path)
    if path is None:
        return FAIL, f"'{settings.nmap_path}' not found on PATH; apt install nmap or set NMAP_PATH"
    major, minor = nmap.PortScanner(nmap_search_path=(path,)).nmap_version()
    if (major, minor) < (7, 80):
        return FAIL, f"nmap {major}.{minor} at {path} is older than 7.80"
    return OK, f"nmap {major}.{minor} at {path}"


def _raw() -> tuple[str, str]:
    return FAIL if caps.raw_sockets() is caps.RawSockets.NONE else OK, caps.describe()


def _source(settings: Settings) -> tuple[str, str]:
    if settings.source_address is None:
        return OK, "not set: the kernel chooses the source address"
    from falcoria_worker import source

    return OK, source.describe(source.resolve(settings.source_address))


def _state_dir(path: Path) -> tuple[str, str]:
    """`run` creates the directory (with its parents) and needs to write in it; under the unit,
    StateDirectory= creates it before the start."""
    uid = os.geteuid()
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK, effective_ids=True):
            return OK, f"{path} writable"
        return FAIL, f"{path} is not writable by uid {uid}"
    if path.exists():
        return FAIL, f"{path} is not a directory"
    parent = next(p for p in path.parents if p.exists() or p == p.parent)
    if not parent.is_dir():
        return FAIL, f"{path} cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=True):
        return FAIL, f"{path} does not exist and uid {uid} cannot create it in {parent} (or set STATE_DIR)"
    return WARN, f"{path} does not exist yet: `run` will create it"


def _client_certificate_hint(exc: BaseException, key: str, tls: bool, certfile: object) -> str:
    """A TLS server that wants a client certificate and gets none often just closes the connection
    (TLS 1.3 refuses after the handshake): say what that usually means instead of a bare EOF."""
    if not tls or certfile:
        return ""
    text = str(exc).lower()
    if "certificate" in text or not any(s in text for s in ("eof occurred", "reset by peer", "_ssl.c")):
        return ""
    return f" (the server closed the TLS connection: if it requires a client certificate, set {key})"


def _redis(settings: Settings) -> tuple[str, str]:
    from falcoria_worker.redis_store import redis_client

    try:
        redis_client(settings).ping()
    except Exception as exc:
        hint = _client_certificate_hint(
            exc, "REDIS_SSL_CERTFILE", settings.redis_ssl, settings.redis_ssl_certfile
        )
        if not hint:
            raise
        return FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0]}{hint}"
    return OK, f"{settings.redis_host}:{settings.redis_port} db {settings.redis_db} answers"


def _rabbitmq(settings: Settings) -> tuple[str, str]:
    from amqp.exceptions import NotFound

    from falcoria_worker import broker

    where = f"{settings.rabbitmq_host}:{settings.rabbitmq_port} vhost {settings.rabbitmq_vhost}"
    try:
        conn = broker.connect(settings)
    except Exception as exc:
        hint = _client_certificate_hint(
            exc, "RABBITMQ_SSL_CERTFILE", settings.rabbitmq_ssl, settings.rabbitmq_ssl_certfile
        )
        if not hint:
            raise
        return FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0]}{hint}"
    with conn:
        try:
            # passive: a health check must not create Tasker's queue
            _name, messages, consumers = conn.channel().queue_declare(
                settings.nmap_scan_queue_name, passive=True
            )
        except NotFound:
            queue = settings.nmap_scan_queue_name
            return OK, f"{where}: connected; {queue} not declared yet (Tasker or `run` will)"
    return (
        OK,
        f"{where}: {settings.nmap_scan_queue_name} has {messages} message(s), {consumers} consumer(s)",
    )


def _scanledger(settings: Settings) -> tuple[str, str]:
    if not settings.backend_base_url:
        return OK, f"not configured: results stay in {settings.state_dir}/results"
    from falcoria_worker.ledger import ScanLedger

    ledger = ScanLedger(
        settings.backend_base_url, settings.worker_backend_token, ca_bundle=ca_bundle(settings), timeout=5
    )
    ledger.health()
    ledger.check_token()
    if settings.backend_base_url.startswith("http://"):
        return WARN, f"{settings.backend_base_url} answers; plain http: the token travels unencrypted"
    return OK, f"{settings.backend_base_url} answers and accepts the token"
