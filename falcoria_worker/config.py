"""Settings: one frozen dataclass and a pure `parse()` from KEY -> text.

Nothing here reads a file or the environment: `settings_io` gathers the layers (files, environment,
credentials, command line) and hands the merged upper-case mapping to `parse()`. Every key has exactly one
text default in `DEFAULTS`, parsed by the same code as operator input, so a default can never be a value
the parser would refuse. Build settings in tests with `parse({"HOSTNAME": "scanner1", ...})` and vary them
with `dataclasses.replace()`.

Every refusal is a `ConfigError(key, problem, fix)`. Messages quote the offending value for ordinary keys
and never for `SECRET_KEYS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from falcoria_worker import setting_checks as v
from falcoria_worker.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Every setting of the design's table, typed. Field `x` is setting `X`.

    Secrets are left out of repr() so a settings object in a log line or traceback cannot leak them.
    """

    # Broker (RabbitMQ). Names must match Tasker's declarations (contract §1.3).
    rabbitmq_host: str
    rabbitmq_port: int
    rabbitmq_user: str
    rabbitmq_password: str = field(repr=False)
    rabbitmq_vhost: str
    rabbitmq_ssl: bool
    rabbitmq_ssl_certfile: Path | None  # a client certificate, for brokers that require one
    rabbitmq_ssl_keyfile: Path | None
    exchange_name: str
    exchange_type: str
    nmap_scan_queue_name: str
    nmap_scan_routing_key: str
    nmap_cancel_queue_name: str
    worker_service_broadcast_queue: str
    # Redis, shared with Tasker.
    redis_host: str
    redis_port: int
    redis_db: int
    redis_pass: str = field(repr=False)
    redis_ssl: bool
    redis_ssl_certfile: Path | None
    redis_ssl_keyfile: Path | None
    # ScanLedger.
    backend_base_url: str | None
    worker_backend_token: str = field(repr=False)
    scanledger_ca_bundle: Path | None
    scanledger_timeout: float
    upload_backoff_max: float
    # Identity.
    instance: str
    # The worker name: the host part of the Celery node name and of every Redis key and field naming this
    # worker. It is HOSTNAME, or `<HOSTNAME>-<INSTANCE>` when SOURCE_ADDRESS is set (see worker_name()).
    hostname: str
    node_name: str
    state_dir: Path
    worker_ip: str | None  # canonical text, as Redis stores it
    source_address: str | None  # nmap sends from it (-S); canonical text
    ip_echo_url: str | None
    # Scanning policy.
    concurrency: int
    nmap_path: str
    nmap_open_ports_opts: str
    nmap_service_opts: str
    nmap_allowed_scripts: tuple[str, ...]
    nmap_extra_flags: tuple[str, ...]
    stats_every: str
    kill_grace: float
    # Scope: canonical CIDR text, for scope.Scope.from_strings().
    scope_allow: tuple[str, ...]
    scope_deny: tuple[str, ...]
    # Reliability.
    status_ttl: int
    lease_ttl: int
    max_attempts: int
    require_task_metadata: bool
    # Logging.
    logger_level: str
    # Observability: Celery task events and node_exporter's textfile collector.
    worker_send_task_events: bool
    metrics_textfile_dir: str  # "" = off, "auto" = Debian's node-exporter directory if it exists, or a path
    # Upstream names accepted so an existing upstream .env loads; unused on the wire (contract §6).
    celery_app_name: str
    queue: str
    routing_key: str
    nmap_cancel_routing_key: str
    nmap_cancel_exchange_name: str
    nmap_cancel_exchange_type: str
    ip_entry_ttl: int
    logger_name: str
    # Keys that were given but are not settings (typos, settings of other programs), sorted.
    unknown_keys: tuple[str, ...] = ()
    # HOSTNAME as configured, before worker_name(): the bare host's own `worker:` key, which a host whose
    # instances all have a SOURCE_ADDRESS no longer refreshes, is named by it.
    machine_hostname: str = ""


# --- the table: key -> (text default, check). Order = Settings field order (a unit test holds them equal).

_KEYS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "RABBITMQ_HOST": ("localhost", v.parse_host),
    "RABBITMQ_PORT": ("5672", v.parse_int_between(1, 65535)),
    "RABBITMQ_USER": ("guest", v.parse_required_text),
    "RABBITMQ_PASSWORD": ("", v.parse_printable),
    "RABBITMQ_VHOST": ("/", v.parse_printable),
    "RABBITMQ_SSL": ("false", v.parse_bool),
    "RABBITMQ_SSL_CERTFILE": ("", v.parse_optional_path),
    "RABBITMQ_SSL_KEYFILE": ("", v.parse_optional_path),
    "EXCHANGE_NAME": ("nmap_exchange", v.parse_amqp_name),
    "EXCHANGE_TYPE": ("topic", v.parse_exchange_type),
    "NMAP_SCAN_QUEUE_NAME": ("nmap_scan_queue", v.parse_amqp_name),
    "NMAP_SCAN_ROUTING_KEY": ("nmap.scan", v.parse_amqp_name),
    "NMAP_CANCEL_QUEUE_NAME": ("nmap_cancel_queue", v.parse_amqp_name),
    "WORKER_SERVICE_BROADCAST_QUEUE": ("worker_service_broadcast", v.parse_amqp_name),
    "REDIS_HOST": ("localhost", v.parse_host),
    "REDIS_PORT": ("6379", v.parse_int_between(1, 65535)),
    # No upper bound: Redis's `databases` setting is configurable (16 is only its default).
    "REDIS_DB": ("3", v.parse_int_between(0, None)),
    "REDIS_PASS": ("", v.parse_printable),
    "REDIS_SSL": ("false", v.parse_bool),
    "REDIS_SSL_CERTFILE": ("", v.parse_optional_path),
    "REDIS_SSL_KEYFILE": ("", v.parse_optional_path),
    "BACKEND_BASE_URL": ("", v.parse_url),
    "WORKER_BACKEND_TOKEN": ("", v.parse_printable),
    "SCANLEDGER_CA_BUNDLE": ("", v.parse_optional_path),
    "SCANLEDGER_TIMEOUT": ("60", v.parse_seconds),
    "UPLOAD_BACKOFF_MAX": ("300", v.parse_seconds),
    "INSTANCE": ("1", v.check_instance),
    "HOSTNAME": ("", v.parse_identity_host),  # settings_io supplies socket.gethostname()
    "NODE_NAME": ("", v.parse_node_name),
    "STATE_DIR": ("", v.parse_path),  # settings_io supplies $STATE_DIRECTORY when systemd sets it
    "WORKER_IP": ("", v.parse_worker_ip),
    "SOURCE_ADDRESS": ("", v.parse_source_address),
    "IP_ECHO_URL": ("", v.parse_url),
    "CONCURRENCY": ("1", v.parse_int_between(1, 64)),
    "NMAP_PATH": ("nmap", v.parse_required_text),
    "NMAP_OPEN_PORTS_OPTS": ("-n -Pn --top-ports 1000", v.parse_required_text),
    "NMAP_SERVICE_OPTS": ("-sV -Pn", v.parse_required_text),
    "NMAP_ALLOWED_SCRIPTS": ("", v.parse_scripts),
    "NMAP_EXTRA_FLAGS": ("", v.parse_flags),
    "STATS_EVERY": ("2s", v.parse_nmap_time),
    "KILL_GRACE": ("2", v.parse_seconds),
    "SCOPE_ALLOW": ("", v.parse_networks),
    "SCOPE_DENY": ("", v.parse_networks),
    "STATUS_TTL": ("604800", v.parse_int_between(1, None)),
    "LEASE_TTL": ("60", v.parse_int_between(1, None)),
    "MAX_ATTEMPTS": ("3", v.parse_int_between(1, 1000)),
    "REQUIRE_TASK_METADATA": ("true", v.parse_bool),
    "LOGGER_LEVEL": ("INFO", v.parse_log_level),
    "WORKER_SEND_TASK_EVENTS": ("false", v.parse_bool),
    "METRICS_TEXTFILE_DIR": ("", v.parse_textfile_dir),
    "CELERY_APP_NAME": ("nmap_celery_consumer", v.parse_printable),
    "QUEUE": ("nmap_queue", v.parse_printable),
    "ROUTING_KEY": ("nmap.#", v.parse_printable),
    "NMAP_CANCEL_ROUTING_KEY": ("nmap.cancel", v.parse_printable),
    "NMAP_CANCEL_EXCHANGE_NAME": ("nmap_cancel_exchange", v.parse_printable),
    "NMAP_CANCEL_EXCHANGE_TYPE": ("fanout", v.parse_printable),
    "IP_ENTRY_TTL": ("4000", v.parse_int_between(0, None)),
    "LOGGER_NAME": ("worker_logger", v.parse_printable),
}

KNOWN_KEYS: tuple[str, ...] = tuple(_KEYS)
DEFAULTS: Mapping[str, str] = {key: default for key, (default, _) in _KEYS.items()}
SECRET_KEYS = v.SECRET_KEYS
# <KEY>_FILE names a file holding the secret (settings_io reads it; parse() never sees these keys).
FILE_KEYS: Mapping[str, str] = {f"{key}_FILE": key for key in sorted(SECRET_KEYS)}
# Paths of TLS client certificates and their private keys. A private key is a secret kept in a file: a
# systemd credential of the key's lower-case name supplies the path (settings_io), so the key can stay
# readable by root only and reach the worker through LoadCredential= like the passwords do.
TLS_FILE_KEYS: tuple[str, ...] = (
    "RABBITMQ_SSL_CERTFILE",
    "RABBITMQ_SSL_KEYFILE",
    "REDIS_SSL_CERTFILE",
    "REDIS_SSL_KEYFILE",
)

# Where settings come from, lowest first: a key takes its value from the last layer that names it.
# settings_io.load() merges its layers in this order and the settings reference lists it from here, so
# the documented order is the order the code applies. Text in `backticks` is a literal name.
LAYERS: tuple[tuple[str, str], ...] = (
    (
        "defaults",
        "the built-in defaults; `HOSTNAME` is the machine's host name, and `STATE_DIR` is"
        " `$STATE_DIRECTORY` when systemd sets it",
    ),
    ("worker.conf", "`/etc/falcoria-worker/worker.conf`, shared by every instance (optional)"),
    ("worker@INSTANCE.conf", "`/etc/falcoria-worker/worker@<INSTANCE>.conf`, for one instance (optional)"),
    ("--config", "each `--config FILE`, in the order given (the file must exist)"),
    ("environment", "environment variables named like a setting, in any case"),
    (
        "credentials",
        "the secrets in `$CREDENTIALS_DIRECTORY/<key in lower case>`, which the unit fills from"
        " `/etc/falcoria-worker/credentials/` with `LoadCredential=`; outside the unit, that directory"
        " itself when the user may read it (root)",
    ),
    ("--set", "each `--set KEY=VALUE` on the command line"),
    ("--instance", "`--instance NAME`, which the unit passes as `%i`; it sets `INSTANCE` only"),
)


def _no_hostname(typed: Mapping[str, object]) -> object:
    raise ConfigError("HOSTNAME", "is empty", "set HOSTNAME to this scanner's host name")


# Defaults computed from earlier settings (INSTANCE comes first in the table) or, for HOSTNAME, supplied by
# settings_io from the machine; DEFAULTS holds "" for them.
_DERIVED: dict[str, Callable[[Mapping[str, object]], object]] = {
    "HOSTNAME": _no_hostname,
    "NODE_NAME": lambda typed: f"worker{typed['instance']}",
    "STATE_DIR": lambda typed: Path("/var/lib/falcoria-worker") / str(typed["instance"]),
}
DERIVED_KEYS: frozenset[str] = frozenset(_DERIVED)


def parse(values: Mapping[str, str]) -> Settings:
    """Typed settings from upper-case KEY -> text; missing keys take `DEFAULTS`.

    Keys that are not settings are kept in `unknown_keys` (so `config` can point at typos) and otherwise
    ignored, like upstream's pydantic settings ignore them.
    """
    typed: dict[str, object] = {}
    for key, (default, check) in _KEYS.items():
        text = values.get(key, default)
        if text == "" and key in _DERIVED:
            typed[key.lower()] = _DERIVED[key](typed)
        elif text == "" and default != "":
            raise ConfigError(key, "is empty", f"set {key} or remove it to use the default ({default})")
        else:
            typed[key.lower()] = check(key, text)

    if typed["backend_base_url"] and not typed["worker_backend_token"]:
        raise ConfigError(
            "WORKER_BACKEND_TOKEN",
            "is empty while BACKEND_BASE_URL is set",
            "put ScanLedger's token in /etc/falcoria-worker/credentials/worker_backend_token",
        )
    for service in ("RABBITMQ", "REDIS"):
        _check_client_certificate(service, typed)
    typed["unknown_keys"] = tuple(sorted(set(values) - set(_KEYS)))
    typed["machine_hostname"] = typed["hostname"]
    typed["hostname"] = worker_name(str(typed["hostname"]), str(typed["instance"]), typed["source_address"])
    return Settings(**typed)  # type: ignore[arg-type]


def worker_name(hostname: str, instance: str, source_address: object) -> str:
    """The name this instance registers and answers Celery pings under.

    An instance that sends from an address of its own registers that address under a name of its own, so
    Tasker lists one worker per address; the others keep the bare host name, as upstream workers do.
    Tasker's liveness loop refreshes `worker:{the part after @}` from ping replies, so the node name, the
    worker key and the running entries must all carry this same name."""
    return f"{hostname}-{instance}" if source_address else hostname


def _check_client_certificate(service: str, typed: Mapping[str, object]) -> None:
    prefix = service.lower()
    certfile, keyfile = typed[f"{prefix}_ssl_certfile"], typed[f"{prefix}_ssl_keyfile"]
    if keyfile and not certfile:
        raise ConfigError(
            f"{service}_SSL_KEYFILE",
            f"is set without {service}_SSL_CERTFILE",
            f"set {service}_SSL_CERTFILE to the client certificate that goes with the key",
        )
    if certfile and not typed[f"{prefix}_ssl"]:
        raise ConfigError(
            f"{service}_SSL_CERTFILE",
            f"is set while {service}_SSL is false (a client certificate needs TLS)",
            f"set {service}_SSL=true, or remove {service}_SSL_CERTFILE",
        )


# --- derived values ------------------------------------------------------------------------------------


def secret_values(settings: Settings) -> tuple[str, ...]:
    """The configured secrets (non-empty), for the log redaction filter."""
    return tuple(v for v in (getattr(settings, key.lower()) for key in sorted(SECRET_KEYS)) if v)


def broker_url(settings: Settings) -> str:
    """amqp:// URL for kombu, with user, password and vhost percent-encoded.

    Upstream formats them raw, so a password with '@', '/' or ':' breaks its URL. kombu unquotes each part,
    and vhost "/" becomes "%2F".
    """
    host = settings.rabbitmq_host
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    user = quote(settings.rabbitmq_user, safe="")
    password = quote(settings.rabbitmq_password, safe="")
    vhost = quote(settings.rabbitmq_vhost, safe="")
    return f"amqp://{user}:{password}@{host}:{settings.rabbitmq_port}/{vhost}"


def redis_kwargs(settings: Settings) -> dict[str, object]:
    """Keyword arguments for redis.Redis(); no password means no AUTH."""
    kwargs: dict[str, object] = {
        "host": settings.redis_host,
        "port": settings.redis_port,
        "db": settings.redis_db,
        "password": settings.redis_pass or None,
        # rediss: certificate and host name verified against the system's CAs (redis-py's default)
        "ssl": settings.redis_ssl,
    }
    if settings.redis_ssl_certfile:
        kwargs["ssl_certfile"] = str(settings.redis_ssl_certfile)
        # None: the key is in the certificate file
        kwargs["ssl_keyfile"] = str(settings.redis_ssl_keyfile) if settings.redis_ssl_keyfile else None
    return kwargs


def ca_bundle(settings: Settings) -> str | None:
    """The CA file for ScanLedger's TLS as requests wants it; None means the system's CAs."""
    return str(settings.scanledger_ca_bundle) if settings.scanledger_ca_bundle else None


def shown_value(settings: Settings, key: str) -> str:
    """A setting as text for `falcoria-worker config`: secrets masked, lists comma-joined."""
    value = getattr(settings, key.lower())
    if key in SECRET_KEYS:
        return "***" if value else "(unset)"
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
