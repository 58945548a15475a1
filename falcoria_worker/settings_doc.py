"""The settings reference, rendered from config.py's tables: keys, defaults, secrets and layer order.

The shipped worker.conf, the man page's CONFIGURATION and SETTINGS sections, the table in docs/design.md
and the layer list in the README are all rendered here, and `scripts/gen-docs` writes them; a unit test
fails when a file differs from what this module renders. Only the prose of each key lives here, in the
order of `config.KNOWN_KEYS`; everything a reader could check against the program comes from config.py.

Text in `backticks` is a literal name: Markdown keeps the backticks, the man page sets it in bold, and
worker.conf drops them. Pure: no file is read or written here.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from falcoria_worker import config

CREDENTIALS_DIR = "/etc/falcoria-worker/credentials"


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    keys: tuple[tuple[str, str], ...]  # (KEY, what it means; "" when the intro says all)


SECTIONS: tuple[Section, ...] = (
    Section(
        "Broker (RabbitMQ)",
        "The names must match what Falcoria's Tasker declares and publishes to.",
        (
            ("RABBITMQ_HOST", "Broker host name or IP address."),
            ("RABBITMQ_PORT", "Broker port."),
            ("RABBITMQ_USER", "Broker user."),
            ("RABBITMQ_PASSWORD", ""),
            ("RABBITMQ_VHOST", "Broker virtual host."),
            (
                "RABBITMQ_SSL",
                "true: amqps, with the broker's certificate and host name checked against the system's"
                " CAs (a private CA: add it to the system's, or point `SSL_CERT_FILE` at it in a unit"
                " drop-in).",
            ),
            (
                "RABBITMQ_SSL_CERTFILE",
                "Client certificate (PEM) for brokers that require one; also the credential"
                " `rabbitmq_ssl_certfile`.",
            ),
            (
                "RABBITMQ_SSL_KEYFILE",
                "Its private key (empty: in the certificate file); better as the credential"
                " `rabbitmq_ssl_keyfile`, which names a root-only file.",
            ),
            ("EXCHANGE_NAME", "Exchange Tasker publishes scan tasks to."),
            ("EXCHANGE_TYPE", "Its type: direct, fanout, headers or topic (Tasker's is topic)."),
            ("NMAP_SCAN_QUEUE_NAME", "Queue of scan tasks, shared by every worker."),
            ("NMAP_SCAN_ROUTING_KEY", "Routing key that binds the scan queue to the exchange."),
            ("NMAP_CANCEL_QUEUE_NAME", "Fanout exchange the worker declares for cancel broadcasts."),
            (
                "WORKER_SERVICE_BROADCAST_QUEUE",
                "Fanout exchange the worker declares for IP-refresh requests.",
            ),
        ),
    ),
    Section(
        "Redis (shared with Tasker)",
        "",
        (
            ("REDIS_HOST", "Redis host name or IP address."),
            ("REDIS_PORT", "Redis port."),
            ("REDIS_DB", "Must be the same database number as Tasker's."),
            ("REDIS_PASS", "Empty = no AUTH."),
            (
                "REDIS_SSL",
                "true: TLS to Redis, with its certificate and host name checked against the system's CAs.",
            ),
            (
                "REDIS_SSL_CERTFILE",
                "Client certificate (PEM) for a Redis that requires one; also the credential"
                " `redis_ssl_certfile`.",
            ),
            (
                "REDIS_SSL_KEYFILE",
                "Its private key (empty: in the certificate file); better as the credential"
                " `redis_ssl_keyfile`.",
            ),
        ),
    ),
    Section(
        "ScanLedger (where reports are uploaded)",
        "",
        (
            (
                "BACKEND_BASE_URL",
                "Base URL, http:// or https://, without credentials. Empty: reports are not uploaded and"
                " stay in `STATE_DIR/results`.",
            ),
            ("WORKER_BACKEND_TOKEN", "Required when `BACKEND_BASE_URL` is set."),
            ("SCANLEDGER_CA_BUNDLE", "CA certificate file for ScanLedger's TLS. Empty = the system's CAs."),
            ("SCANLEDGER_TIMEOUT", "Seconds per HTTP request."),
            (
                "UPLOAD_BACKOFF_MAX",
                "Finished reports wait in a disk spool while ScanLedger is unreachable; the retry backoff"
                " grows up to this many seconds.",
            ),
        ),
    ),
    Section(
        "Identity",
        "",
        (
            (
                "INSTANCE",
                "Instance name: the N of `falcoria-worker@N`, passed by the unit. Leave it unset here.",
            ),
            (
                "HOSTNAME",
                "This scanner's name in Redis keys and in the Celery node name. Empty = the machine's host"
                " name. Tasker's liveness check needs it to match Celery's. An instance with a"
                " SOURCE_ADDRESS is named `<HOSTNAME>-<INSTANCE>` instead, in all of them.",
            ),
            ("NODE_NAME", "Celery node name, `NODE_NAME@HOSTNAME`. Empty = `worker<INSTANCE>`."),
            (
                "STATE_DIR",
                "Spool, results and nmap work files. Empty = the unit's StateDirectory"
                " (`/var/lib/falcoria-worker/<INSTANCE>`).",
            ),
            (
                "WORKER_IP",
                "IP address registered in Redis for Tasker. Empty = SOURCE_ADDRESS when set, else the source"
                " address of the default route.",
            ),
            (
                "SOURCE_ADDRESS",
                "Address nmap sends this instance's scans from (nmap -S), for hosts with several addresses:"
                " set it per instance, in /etc/falcoria-worker/worker@<INSTANCE>.conf. It must be an address"
                " of this host; tasks of the other address family are refused. The instance then registers"
                " this address under the worker name `<HOSTNAME>-<INSTANCE>`. Empty = the kernel chooses.",
            ),
            (
                "IP_ECHO_URL",
                'Optional "what is my IP" URL of your own, asked for the public address. Empty = off; no'
                " third-party service is ever asked.",
            ),
        ),
    ),
    Section(
        "Scanning policy",
        "",
        (
            ("CONCURRENCY", "Scans running at once in one instance (1..64)."),
            ("NMAP_PATH", "The nmap program to run."),
            (
                "NMAP_OPEN_PORTS_OPTS",
                "Default options of `falcoria-worker scan` for phase 1 (open ports); tasks from Tasker"
                " bring their own.",
            ),
            ("NMAP_SERVICE_OPTS", "Default options of `falcoria-worker scan` for phase 2 (services)."),
            (
                "NMAP_ALLOWED_SCRIPTS",
                "Comma list of NSE script names a task may name with `--script` (e.g. http-title,ssl-cert)."
                " Empty = `--script` is refused: NSE scripts run code.",
            ),
            (
                "NMAP_EXTRA_FLAGS",
                "Comma list of extra value-less nmap flags to allow (e.g. --reason,--badsum).",
            ),
            ("STATS_EVERY", "How often nmap reports progress (nmap time: 500ms, 2s, 1m)."),
            ("KILL_GRACE", "Seconds between SIGTERM and SIGKILL when an nmap run is stopped."),
        ),
    ),
    Section(
        "Scope",
        "Comma lists of CIDRs. The most specific network containing a target decides (a tie denies). A"
        " built-in deny list covers loopback, link-local, multicast and other special ranges; only a more"
        " specific `SCOPE_ALLOW` entry can open part of it.",
        (
            ("SCOPE_ALLOW", "Empty = every address not denied. A list replaces that default."),
            ("SCOPE_DENY", "Denied on top of the built-in list."),
        ),
    ),
    Section(
        "Reliability",
        "",
        (
            ("STATUS_TTL", "Seconds the `task:{id}:status` record is kept in Redis."),
            ("LEASE_TTL", "Seconds a running task's lease lives without a heartbeat."),
            (
                "MAX_ATTEMPTS",
                "Deliveries of one task before it is recorded as failed (a task that keeps crashing the"
                " worker must not loop forever).",
            ),
            (
                "REQUIRE_TASK_METADATA",
                "Skip a task whose Tasker metadata is gone (Tasker stopped it while it was queued).",
            ),
        ),
    ),
    Section(
        "Logging",
        "",
        (
            (
                "LOGGER_LEVEL",
                "DEBUG, INFO, WARNING or ERROR. Secrets are removed from log lines at every level.",
            ),
        ),
    ),
    Section(
        "Observability",
        "",
        (
            (
                "WORKER_SEND_TASK_EVENTS",
                "Send Celery task events (task-received, -started, -succeeded, ...) for Flower and"
                " `celery events`, like `celery worker -E`. Worker events (online, heartbeat, offline) are"
                " always sent; Flower's `enable_events` switches task events on too.",
            ),
            (
                "METRICS_TEXTFILE_DIR",
                "Directory of node_exporter's textfile collector for `falcoria-worker@<N>.prom`. Empty = no"
                " metrics file; auto = `/var/lib/prometheus/node-exporter` when it exists (Debian's"
                " prometheus-node-exporter); or an absolute path.",
            ),
        ),
    ),
    Section(
        "Upstream compatibility",
        "Accepted so that an upstream worker .env loads unchanged; this worker does not use them (they are"
        " not part of the wire protocol).",
        (
            ("CELERY_APP_NAME", ""),
            ("QUEUE", ""),
            ("ROUTING_KEY", ""),
            ("NMAP_CANCEL_ROUTING_KEY", ""),
            ("NMAP_CANCEL_EXCHANGE_NAME", ""),
            ("NMAP_CANCEL_EXCHANGE_TYPE", ""),
            ("IP_ENTRY_TTL", ""),
            ("LOGGER_NAME", ""),
        ),
    ),
)


def meaning(key: str, text: str) -> str:
    """A key's prose, with what every secret has in common said first."""
    if key not in config.SECRET_KEYS:
        return text
    where = f"Secret: use `{CREDENTIALS_DIR}/{key.lower()}` instead."
    return f"{where} {text}" if text else where


_LITERAL = re.compile(r"`([^`]*)`")


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _plain(text: str) -> str:
    return _LITERAL.sub(r"\1", text)


def _wrapped(text: str, prefix: str, width: int, hanging: str | None = None) -> list[str]:
    """`text` without backticks, in lines of at most `width` that start with `prefix` (then `hanging`)."""
    lines = textwrap.wrap(
        _plain(text),
        width=width,
        initial_indent=prefix,
        subsequent_indent=prefix if hanging is None else hanging,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return [line.rstrip() for line in lines]


# --- worker.conf -----------------------------------------------------------------------------------------

_CONF_INTRO = (
    "Every setting is listed below with its default, commented out: remove the leading '#' to change one."
    " `falcoria-worker config --instance N` prints every value and where it came from."
)
_CONF_SYNTAX = (
    "Syntax is systemd's EnvironmentFile=: KEY=VALUE, one per line; '#' or ';' start a comment line, but a"
    " '#' after a value is part of the value. Quote values with spaces or backslashes: \"double\" (with"
    " \\\" \\\\ \\$ escapes) or 'single' (literal). Names are case-insensitive, so an upstream Falcoria"
    " worker .env works as is."
)
_CONF_SECRETS = (
    "SECRETS do not belong in this file. Put each one in its own file, named after the setting in lower"
    f" case, in {CREDENTIALS_DIR}/ (root-owned, mode 0600):"
)
_CONF_CREDENTIALS = (
    "The unit hands them to the worker with LoadCredential=, so they never enter the environment; a"
    " credential wins over a value set here or in the environment. Outside systemd, {} may name a file"
    " holding the secret instead. One trailing newline in a secret file is ignored."
)
_CONF_WIDTH = 88


def _conf(text: str) -> list[str]:
    return _wrapped(text, "# ", _CONF_WIDTH)


def worker_conf() -> str:
    """The whole shipped /etc/falcoria-worker/worker.conf."""
    lines = ["# /etc/falcoria-worker/worker.conf: settings shared by every falcoria-worker@N instance.", "#"]
    lines += [*_conf(_CONF_INTRO), "#", "# Where a setting comes from, lowest first (a later layer wins):"]
    for number, (_, what) in enumerate(config.LAYERS, start=1):
        lines += _wrapped(what, f"#   {number}. ", _CONF_WIDTH, hanging="#      ")
    lines += ["#", *_conf(_CONF_SYNTAX), "#", *_conf(_CONF_SECRETS)]
    lines += [f"#     {CREDENTIALS_DIR}/{key.lower()}" for key in sorted(config.SECRET_KEYS)]
    *others, last = sorted(config.FILE_KEYS)
    lines += _conf(_CONF_CREDENTIALS.format(f"{', '.join(others)} and {last}"))
    for section in SECTIONS:
        lines += ["", f"## {section.title} ".ljust(_CONF_WIDTH - 1, "#"), *_conf(section.intro), ""]
        for key, text in section.keys:
            lines += [*_conf(meaning(key, text)), f"#{key}={config.DEFAULTS[key]}"]
    return "\n".join(lines) + "\n"


# --- the man page ----------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Plain text for a roff line: backslashes and hyphens escaped, `literals` in bold."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    line = _LITERAL.sub(r"\\fB\1\\fR", escaped)
    return "\\&" + line if line.startswith((".", "'")) else line


def man_settings() -> str:
    """The man page's layer order and SETTINGS section (between its marker comments)."""
    lines = [
        ".PP",
        "Layers, lowest first; a key takes its value from the last layer that names it:",
        ".RS",
    ]
    for number, (_, what) in enumerate(config.LAYERS, start=1):
        lines += [f".IP {number}. 4", _roff(_sentence(what))]
    lines += [
        ".RE",
        ".PP",
        ".B falcoria\\-worker config",
        "shows the result and where each value came from.",
        ".SH SETTINGS",
        "Each setting with its default; the shipped",
        ".I worker.conf",
        "lists the same.",
    ]
    for section in SECTIONS:
        lines += [f".SS {_roff(section.title)}"]
        if section.intro:
            lines += [_roff(section.intro)]
        for key, text in section.keys:
            if meaning(key, text):
                lines += [".TP", _man_key(key), _roff(meaning(key, text))]
        # Keys the section's introduction covers are one list, not a paragraph each.
        bare = [_man_key(key) for key, text in section.keys if not meaning(key, text)]
        if bare:
            lines += [".PP", ".RS", *"\n.br\n".join(bare).split("\n"), ".RE"]
    return "\n".join(lines) + "\n"


def _man_key(key: str) -> str:
    default = config.DEFAULTS[key]
    return f'.BR {_roff(key)} " = {_roff(default)}"' if default else f".B {_roff(key)}"


# --- Markdown --------------------------------------------------------------------------------------------


def markdown_layers() -> str:
    """The layer order as a numbered Markdown list."""
    items = [f"{number}. {_sentence(what)}" for number, (_, what) in enumerate(config.LAYERS, start=1)]
    return "\n".join(items) + "\n"


def _row(*cells: str) -> str:
    """A Markdown table row; a '|' inside a cell is escaped."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table() -> str:
    """The layer order and every setting with its default and meaning, for docs/design.md."""
    lines = [
        "Layers, lowest first; a key takes its value from the last layer that names it:",
        "",
        markdown_layers().rstrip("\n"),
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for section in SECTIONS:
        lines.append(_row(f"**{section.title}**", "", section.intro))
        for key, text in section.keys:
            default = config.DEFAULTS[key]
            lines.append(_row(f"`{key}`", f"`{default}`" if default else "(empty)", meaning(key, text)))
    return "\n".join(lines) + "\n"


# --- the files -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A file of the repository, wholly rendered (no markers) or rendered between two marker lines."""

    path: str
    render: Callable[[], str]
    begin: str = ""
    end: str = ""

    def regenerated(self, current: str) -> str:
        """`current` with the rendered part replaced; raises ValueError if a marker is missing."""
        if not self.begin:
            return self.render()
        head, begin, rest = current.partition(self.begin + "\n")
        _, end, tail = rest.partition(self.end + "\n")
        if not begin or not end:
            raise ValueError(f"{self.path}: the lines {self.begin!r} and {self.end!r} must both be there")
        return head + begin + self.render() + end + tail


_MD_BEGIN = "<!-- {}: generated from falcoria_worker/config.py by `make docs`; edit settings_doc.py -->"
_MD_END = "<!-- end of the generated {} -->"

TARGETS: tuple[Target, ...] = (
    Target("packaging/debian/worker.conf", worker_conf),
    Target(
        "packaging/debian/falcoria-worker.8",
        man_settings,
        '.\\" settings: generated from falcoria_worker/config.py by `make docs`; edit settings_doc.py',
        '.\\" end of the generated settings',
    ),
    Target("docs/design.md", markdown_table, _MD_BEGIN.format("settings"), _MD_END.format("settings")),
    Target("README.md", markdown_layers, _MD_BEGIN.format("layers"), _MD_END.format("layers")),
)
