"""Value checks of the settings: each takes (key, text) and returns the typed value or raises ConfigError.

`config` keeps the table that names, for every key, its text default and which of these checks parses it.
Messages quote the offending value, except for `SECRET_KEYS`, whose values never reach a message.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from falcoria_worker.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SECRET_KEYS: frozenset[str] = frozenset({"RABBITMQ_PASSWORD", "REDIS_PASS", "WORKER_BACKEND_TOKEN"})


def quoted(text: str) -> str:
    """The offending value for an error message, bounded so a pasted file cannot flood the log."""
    return repr(text) if len(text) <= 80 else repr(text[:80]) + "..."


def parse_printable(key: str, text: str) -> str:
    # A control character in a setting is a paste accident at best and header/argv injection at worst.
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        shown = "" if key in SECRET_KEYS else f" {quoted(text)}"
        raise ConfigError(key, f"value{shown} contains a control character", f"set {key} on one line")
    return text


def parse_required_text(key: str, text: str) -> str:
    if not text.strip():
        raise ConfigError(key, "is empty", f"set {key} or remove it to use the default")
    return parse_printable(key, text)


def parse_int_between(low: int, high: int | None) -> Callable[[str, str], int]:
    span = f"between {low} and {high}" if high is not None else f"of at least {low}"

    def check(key: str, text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise ConfigError(
                key, f"{quoted(text)} is not a whole number", f"set {key} to a number {span}"
            ) from None
        if value < low or (high is not None and value > high):
            raise ConfigError(key, f"{value} is out of range", f"set {key} to a number {span}")
        return value

    return check


def parse_seconds(key: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"{quoted(text)} is not a positive number of seconds", f"set {key} to e.g. 60")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(key: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(key, f"{quoted(text)} is not a boolean", f"set {key} to true or false")


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def parse_host(key: str, text: str) -> str:
    """A DNS name or an IP address (brackets around IPv6 are dropped: URLs add their own)."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        pass
    if len(bare) > 253 or not _DNS_NAME.fullmatch(bare):
        raise ConfigError(
            key, f"{quoted(text)} is not a host name or IP address", f"set {key} to e.g. localhost"
        )
    return bare


def parse_identity_host(key: str, text: str) -> str:
    """This machine's name: Redis keys and the Celery node name carry it, so no ':' '@' or spaces."""
    if len(text) > 253 or not _DNS_NAME.fullmatch(text) or text.endswith("."):
        raise ConfigError(
            key,
            f"{quoted(text)} is not a host name (letters, digits, '-', '_' and dots)",
            f"set {key} to this scanner's host name, as Tasker sees it in Celery node names",
        )
    return text


_INSTANCE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def check_instance(key: str, text: str) -> str:
    """Also used by settings_io before the instance name becomes part of a file name."""
    if not _INSTANCE.fullmatch(text):
        raise ConfigError(
            key,
            f"{quoted(text)} is not an instance name",
            f"set {key} to 1 to 32 letters, digits, '-' or '_' (the %i of falcoria-worker@%i)",
        )
    return text


_NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def parse_node_name(key: str, text: str) -> str:
    if not _NODE_NAME.fullmatch(text):
        raise ConfigError(
            key, f"{quoted(text)} is not a node name", f"set {key} to letters, digits, '.', '-' or '_'"
        )
    return text


# AMQP short strings are at most 255 bytes; the charset is what RabbitMQ names conventionally use and keeps
# '#'/'*' for routing-key wildcards.
_AMQP_NAME = re.compile(r"[A-Za-z0-9_.:#*-]{1,255}")


def parse_amqp_name(key: str, text: str) -> str:
    if not _AMQP_NAME.fullmatch(text):
        raise ConfigError(
            key, f"{quoted(text)} is not an AMQP name", f"set {key} to letters, digits, '.', '-', '_' or ':'"
        )
    return text


_EXCHANGE_TYPES = ("direct", "fanout", "headers", "topic")


def parse_exchange_type(key: str, text: str) -> str:
    if text not in _EXCHANGE_TYPES:
        raise ConfigError(key, f"{quoted(text)} is not an exchange type", f"set {key} to topic (Tasker's)")
    return text


def parse_url(key: str, text: str) -> str | None:
    """An http(s) base URL without credentials, trailing '/' stripped (paths are appended to it).

    The URL itself is never quoted back: a mistyped one may carry a password or a token.
    """
    if not text:
        return None
    parse_printable(key, text)
    fix = f"set {key} to a plain URL like https://scanledger.example:8443"
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a port outside 0..65535
    except ValueError:
        raise ConfigError(key, "is not a valid URL", fix) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(key, f"scheme {quoted(parts.scheme)} is not http or https", fix)
    if not parts.hostname:
        raise ConfigError(key, "has no host", fix)
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "contains user:password@", f"remove the credentials from {key}")
    if parts.query or parts.fragment:
        raise ConfigError(key, "has a ?query or #fragment", fix)
    return text.rstrip("/")


def parse_optional_path(key: str, text: str) -> Path | None:
    return Path(parse_printable(key, text)) if text else None


def parse_path(key: str, text: str) -> Path:
    return Path(parse_printable(key, text))


def parse_worker_ip(key: str, text: str) -> str | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip()).compressed
    except ValueError:
        raise ConfigError(
            key, f"{quoted(text)} is not an IP address", f"set {key} to e.g. 203.0.113.7 or leave it empty"
        ) from None


def parse_source_address(key: str, text: str) -> str | None:
    if not text:
        return None
    fix = f"set {key} to one of this host's own addresses, e.g. 203.0.113.7, or leave it empty"
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise ConfigError(key, f"{quoted(text)} is not an IP address", fix) from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ConfigError(key, f"{address} cannot be the source of a scan", fix)
    return address.compressed


def parse_items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_SCRIPT = re.compile(r"[a-z0-9_-]+")


def parse_scripts(key: str, text: str) -> tuple[str, ...]:
    names = parse_items(text)
    for name in names:
        if not _SCRIPT.fullmatch(name):
            raise ConfigError(
                key,
                f"{quoted(name)} is not an NSE script name",
                f"list script names like http-title,ssl-cert in {key} (lower case, no .nse, no paths)",
            )
    return tuple(dict.fromkeys(names))


_FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9-]*")


def parse_flags(key: str, text: str) -> tuple[str, ...]:
    flags = parse_items(text)
    for flag in flags:
        if not _FLAG.fullmatch(flag):
            raise ConfigError(
                key, f"{quoted(flag)} is not an nmap flag", f"list value-less flags like --reason,-v in {key}"
            )
    return tuple(dict.fromkeys(flags))


def parse_networks(key: str, text: str) -> tuple[str, ...]:
    networks = []
    for item in parse_items(text):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            # strict=True: "10.0.0.1/8" is more likely a typo than a wish for 10.0.0.0/8.
            raise ConfigError(
                key,
                f"{quoted(item)} is not a network ({exc})",
                f"list CIDRs like 10.0.0.0/8,2001:db8::/32 in {key}",
            ) from None
    return tuple(dict.fromkeys(networks))


_TIME_SPEC = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:ms|s|m|h)?")


def parse_nmap_time(key: str, text: str) -> str:
    value = text.strip()
    if not _TIME_SPEC.fullmatch(value) or float(re.sub(r"[a-z]+$", "", value)) <= 0:
        raise ConfigError(key, f"{quoted(text)} is not an nmap time", f"set {key} to e.g. 2s, 500ms or 1m")
    return value


def parse_log_level(key: str, text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            key, f"{quoted(text)} is not a log level", f"set {key} to one of {', '.join(LOG_LEVELS)}"
        )
    return level


def parse_textfile_dir(key: str, text: str) -> str:
    # Resolving "auto" needs the file system, so it happens in the metrics edge, not here.
    if text in ("", "auto") or text.startswith("/"):
        return parse_printable(key, text)
    raise ConfigError(key, f"{quoted(text)} is not an absolute path", f"set {key} to auto or a directory")
