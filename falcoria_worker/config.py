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

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from falcoria_worker.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
    hostname: str
    node_name: str
    state_dir: Path
    worker_ip: str | None  # canonical text, as Redis stores it
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


# --- value checks: each takes (key, text) and returns the typed value or raises ConfigError ----------


def _shown(text: str) -> str:
    """The offending value for an error message, bounded so a pasted file cannot flood the log."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def _printable(key: str, text: str) -> str:
    # A control character in a setting is a paste accident at best and header/argv injection at worst.
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        shown = "" if key in SECRET_KEYS else f" {_shown(text)}"
        raise ConfigError(key, f"value{shown} contains a control character", f"set {key} on one line")
    return text


def _required_text(key: str, text: str) -> str:
    if not text.strip():
        raise ConfigError(key, "is empty", f"set {key} or remove it to use the default")
    return _printable(key, text)


def _int_between(low: int, high: int | None) -> Callable[[str, str], int]:
    span = f"between {low} and {high}" if high is not None else f"of at least {low}"

    def check(key: str, text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ConfigError(
                key, f"{_shown(text)} is not a whole number", f"set {key} to a number {span}"
            ) from None
        if value < low or (high is not None and value > high):
            raise ConfigError(key, f"{value} is out of range", f"set {key} to a number {span}")
        return value

    return check


def _seconds(key: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"{_shown(text)} is not a positive number of seconds", f"set {key} to e.g. 60")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(key: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(key, f"{_shown(text)} is not a boolean", f"set {key} to true or false")


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _host(key: str, text: str) -> str:
    """A DNS name or an IP address (brackets around IPv6 are dropped: URLs add their own)."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        pass
    if len(bare) > 253 or not _DNS_NAME.fullmatch(bare):
        raise ConfigError(
            key, f"{_shown(text)} is not a host name or IP address", f"set {key} to e.g. localhost"
        )
    return bare


def _identity_host(key: str, text: str) -> str:
    """This machine's name: Redis keys and the Celery node name carry it, so no ':' '@' or spaces."""
    if len(text) > 253 or not _DNS_NAME.fullmatch(text) or text.endswith("."):
        raise ConfigError(
            key,
            f"{_shown(text)} is not a host name (letters, digits, '-', '_' and dots)",
            f"set {key} to this scanner's host name, as Tasker sees it in Celery node names",
        )
    return text


_INSTANCE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def check_instance(key: str, text: str) -> str:
    """Also used by settings_io before the instance name becomes part of a file name."""
    if not _INSTANCE.fullmatch(text):
        raise ConfigError(
            key,
            f"{_shown(text)} is not an instance name",
            f"set {key} to 1 to 32 letters, digits, '-' or '_' (the %i of falcoria-worker@%i)",
        )
    return text


_NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _node_name(key: str, text: str) -> str:
    if not _NODE_NAME.fullmatch(text):
        raise ConfigError(
            key, f"{_shown(text)} is not a node name", f"set {key} to letters, digits, '.', '-' or '_'"
        )
    return text


# AMQP short strings are at most 255 bytes; the charset is what RabbitMQ names conventionally use and keeps
# '#'/'*' for routing-key wildcards.
_AMQP_NAME = re.compile(r"[A-Za-z0-9_.:#*-]{1,255}")


def _amqp_name(key: str, text: str) -> str:
    if not _AMQP_NAME.fullmatch(text):
        raise ConfigError(
            key, f"{_shown(text)} is not an AMQP name", f"set {key} to letters, digits, '.', '-', '_' or ':'"
        )
    return text


_EXCHANGE_TYPES = ("direct", "fanout", "headers", "topic")


def _exchange_type(key: str, text: str) -> str:
    if text not in _EXCHANGE_TYPES:
        raise ConfigError(key, f"{_shown(text)} is not an exchange type", f"set {key} to topic (Tasker's)")
    return text


def _url(key: str, text: str) -> str | None:
    """An http(s) base URL without credentials, trailing '/' stripped (paths are appended to it).

    The URL itself is never quoted back: a mistyped one may carry a password or a token.
    """
    if not text:
        return None
    _printable(key, text)
    fix = f"set {key} to a plain URL like https://scanledger.example:8443"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a port outside 0..65535
    except ValueError:
        raise ConfigError(key, "is not a valid URL", fix) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(key, f"scheme {_shown(parts.scheme)} is not http or https", fix)
    if not parts.hostname:
        raise ConfigError(key, "has no host", fix)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "contains user:password@", f"remove the credentials from {key}")
    if parts.query or parts.fragment:
        raise ConfigError(key, "has a ?query or #fragment", fix)
    return text.rstrip("/")


def _optional_path(key: str, text: str) -> Path | None:
    return Path(_printable(key, text)) if text else None


def _path(key: str, text: str) -> Path:
    return Path(_printable(key, text))


def _worker_ip(key: str, text: str) -> str | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        raise ConfigError(
            key, f"{_shown(text)} is not an IP address", f"set {key} to e.g. 203.0.113.7 or leave it empty"
        ) from None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_SCRIPT = re.compile(r"[a-z0-9_-]+")


def _scripts(key: str, text: str) -> tuple[str, ...]:
    names = _items(text)
    for name in names:
        if not _SCRIPT.fullmatch(name):
            raise ConfigError(
                key,
                f"{_shown(name)} is not an NSE script name",
                f"list script names like http-title,ssl-cert in {key} (lower case, no .nse, no paths)",
            )
    return tuple(dict.fromkeys(names))


_FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9-]*")


def _flags(key: str, text: str) -> tuple[str, ...]:
    flags = _items(text)
    for flag in flags:
        if not _FLAG.fullmatch(flag):
            raise ConfigError(
                key, f"{_shown(flag)} is not an nmap flag", f"list value-less flags like --reason,-v in {key}"
            )
    return tuple(dict.fromkeys(flags))


def _networks(key: str, text: str) -> tuple[str, ...]:
    networks = []
    for item in _items(text):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            # strict=True: "10.0.0.1/8" is more likely a typo than a wish for 10.0.0.0/8.
            raise ConfigError(
                key,
                f"{_shown(item)} is not a network ({exc})",
                f"list CIDRs like 10.0.0.0/8,2001:db8::/32 in {key}",
            ) from None
    return tuple(dict.fromkeys(networks))


_TIME_SPEC = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h)?")


def _nmap_time(key: str, text: str) -> str:
    value = text.strip()
    if not _TIME_SPEC.fullmatch(value) or float(re.sub(r"[a-z]+$", "", value)) <= 0:
        raise ConfigError(key, f"{_shown(text)} is not an nmap time", f"set {key} to e.g. 2s, 500ms or 1m")
    return value


def _log_level(key: str, text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            key, f"{_shown(text)} is not a log level", f"set {key} to one of {', '.join(LOG_LEVELS)}"
        )
    return level


def _textfile_dir(key: str, text: str) -> str:
    # Resolving "auto" needs the file system, so it happens in the metrics edge, not here.
    if text in ("", "auto") or text.startswith("/"):
        return _printable(key, text)
    raise ConfigError(key, f"{_shown(text)} is not an absolute path", f"set {key} to auto or a directory")


# --- the table: key -> (text default, check). Order = Settings field order (a unit test holds them equal).

_KEYS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "RABBITMQ_HOST": ("localhost", _host),
    "RABBITMQ_PORT": ("5672", _int_between(1, 65535)),
    "RABBITMQ_USER": ("guest", _required_text),
    "RABBITMQ_PASSWORD": ("", _printable),
    "RABBITMQ_VHOST": ("/", _printable),
    "RABBITMQ_SSL": ("false", _bool),
    "RABBITMQ_SSL_CERTFILE": ("", _optional_path),
    "RABBITMQ_SSL_KEYFILE": ("", _optional_path),
    "EXCHANGE_NAME": ("nmap_exchange", _amqp_name),
    "EXCHANGE_TYPE": ("topic", _exchange_type),
    "NMAP_SCAN_QUEUE_NAME": ("nmap_scan_queue", _amqp_name),
    "NMAP_SCAN_ROUTING_KEY": ("nmap.scan", _amqp_name),
    "NMAP_CANCEL_QUEUE_NAME": ("nmap_cancel_queue", _amqp_name),
    "WORKER_SERVICE_BROADCAST_QUEUE": ("worker_service_broadcast", _amqp_name),
    "REDIS_HOST": ("localhost", _host),
    "REDIS_PORT": ("6379", _int_between(1, 65535)),
    # No upper bound: Redis's `databases` setting is configurable (16 is only its default).
    "REDIS_DB": ("3", _int_between(0, None)),
    "REDIS_PASS": ("", _printable),
    "REDIS_SSL": ("false", _bool),
    "REDIS_SSL_CERTFILE": ("", _optional_path),
    "REDIS_SSL_KEYFILE": ("", _optional_path),
    "BACKEND_BASE_URL": ("", _url),
    "WORKER_BACKEND_TOKEN": ("", _printable),
    "SCANLEDGER_CA_BUNDLE": ("", _optional_path),
    "SCANLEDGER_TIMEOUT": ("60", _seconds),
    "UPLOAD_BACKOFF_MAX": ("300", _seconds),
    "INSTANCE": ("1", check_instance),
    "HOSTNAME": ("", _identity_host),  # settings_io supplies socket.gethostname()
    "NODE_NAME": ("", _node_name),
    "STATE_DIR": ("", _path),  # settings_io supplies $STATE_DIRECTORY when systemd sets it
    "WORKER_IP": ("", _worker_ip),
    "IP_ECHO_URL": ("", _url),
    "CONCURRENCY": ("1", _int_between(1, 64)),
    "NMAP_PATH": ("nmap", _required_text),
    "NMAP_OPEN_PORTS_OPTS": ("-n -Pn --top-ports 1000", _required_text),
    "NMAP_SERVICE_OPTS": ("-sV -Pn", _required_text),
    "NMAP_ALLOWED_SCRIPTS": ("", _scripts),
    "NMAP_EXTRA_FLAGS": ("", _flags),
    "STATS_EVERY": ("2s", _nmap_time),
    "KILL_GRACE": ("2", _seconds),
    "SCOPE_ALLOW": ("", _networks),
    "SCOPE_DENY": ("", _networks),
    "STATUS_TTL": ("604800", _int_between(1, None)),
    "LEASE_TTL": ("60", _int_between(1, None)),
    "MAX_ATTEMPTS": ("3", _int_between(1, 1000)),
    "REQUIRE_TASK_METADATA": ("true", _bool),
    "LOGGER_LEVEL": ("INFO", _log_level),
    "WORKER_SEND_TASK_EVENTS": ("false", _bool),
    "METRICS_TEXTFILE_DIR": ("", _textfile_dir),
    "CELERY_APP_NAME": ("nmap_celery_consumer", _printable),
    "QUEUE": ("nmap_queue", _printable),
    "ROUTING_KEY": ("nmap.#", _printable),
    "NMAP_CANCEL_ROUTING_KEY": ("nmap.cancel", _printable),
    "NMAP_CANCEL_EXCHANGE_NAME": ("nmap_cancel_exchange", _printable),
    "NMAP_CANCEL_EXCHANGE_TYPE": ("fanout", _printable),
    "IP_ENTRY_TTL": ("4000", _int_between(0, None)),
    "LOGGER_NAME": ("worker_logger", _printable),
}

KNOWN_KEYS: tuple[str, ...] = tuple(_KEYS)
DEFAULTS: Mapping[str, str] = {key: default for key, (default, _) in _KEYS.items()}
SECRET_KEYS: frozenset[str] = frozenset({"RABBITMQ_PASSWORD", "REDIS_PASS", "WORKER_BACKEND_TOKEN"})
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
        " `/etc/falcoria-worker/credentials/` with `LoadCredential=`",
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
    return Settings(**typed)  # type: ignore[arg-type]


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
