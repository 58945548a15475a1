"""Logging: journald with structured fields under systemd, readable lines on stderr elsewhere.

Secrets are removed when a record is created (a log-record factory), before any handler, ours or not, can
see it: configured secret values in every form they are likely to appear in (raw, URL-encoded, escaped),
plus generic shapes (Authorization headers, Bearer tokens, user:password@ in URLs, password=/token= pairs).
The message is formatted and redacted then, and exceptions are rendered to redacted text, so neither the
arguments nor the exception object travel further. Our handlers run the same filter again for fields
attached with `extra=`.

Per-task context (task, project, target, phase) lives in a contextvar, so each scan thread has its own;
a filter on our handlers copies it onto each record as TASK_ID, PROJECT_ID, TARGET and PHASE, which
JournalHandler sends as journal fields (`journalctl TASK_ID=...`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from urllib.parse import quote, quote_plus

MASK = "***"
NOISY_LOGGERS = ("amqp", "kombu", "urllib3")

# (record attribute / journal field, label in the stderr line)
_FIELDS = (("TASK_ID", "task"), ("PROJECT_ID", "project"), ("TARGET", "target"), ("PHASE", "phase"))
_context: ContextVar[Mapping[str, str]] = ContextVar(
    "falcoria_worker_log_context", default=MappingProxyType({})
)

_REDACTED = "_falcoria_redacted"  # set on records whose message, args and exception are already redacted
_OURS = "_falcoria_worker"  # marks our handler, so a second setup_logging() replaces it
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime", _REDACTED}
)


# --- task context ---------------------------------------------------------------------------------------


@contextmanager
def task_context(
    *,
    task_id: str | None = None,
    project_id: str | None = None,
    target: str | None = None,
    phase: str | None = None,
) -> Iterator[None]:
    """Tag every record logged in this thread inside the block. Replaces (does not merge with) an outer
    context, so a pool thread never carries a previous task's fields."""
    given = (task_id, project_id, target, phase)
    fields = {name: value for (name, _), value in zip(_FIELDS, given, strict=True) if value}
    token = _context.set(fields)
    try:
        yield
    finally:
        _context.reset(token)


def set_phase(phase: str) -> None:
    """Change PHASE inside the current task_context(); outside one it does nothing."""
    current = _context.get()
    if current:
        _context.set({**current, "PHASE": phase})


class ContextFilter(logging.Filter):
    """Copies the task context onto the record; fields passed with `extra=` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


# --- redaction ------------------------------------------------------------------------------------------

# A key that names a secret: password, passwd, pwd, pass, token, secret, api_key, with any prefix
# (REDIS_PASS, WORKER_BACKEND_TOKEN, x-api-key).
_SENSITIVE_KEY = r"\b[\w.-]*(?:password|passwd|pwd|pass|token|secret|api[_-]?key)"
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer abc / {'Authorization': 'Basic abc'}: keep the scheme word, drop the credential.
    (
        re.compile(
            r"""(?i)(\bauthorization\b["']?\s*[:=]\s*["']?(?:(?:bearer|basic|token|digest)\s+)?)[^\s"',;}]+"""
        ),
        rf"\1{MASK}",
    ),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/-]+=*"), rf"\1{MASK}"),
    # scheme://user:password@host: greedy up to the last '@' before the path, for unencoded '@' in passwords.
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s/]*@"), rf"\1{MASK}@"),
    # password='a b', "token": "..." (a quoted value is masked up to its closing quote, spaces included)
    (
        re.compile(rf"""(?i)({_SENSITIVE_KEY}["']?\s*[=:]\s*)(["'])(?:(?!\2).)*\2"""),
        rf"\1\2{MASK}\2",
    ),
    # password=..., REDIS_PASS: ..., x-api-key=... (unquoted, up to a delimiter)
    (
        re.compile(rf"""(?i)({_SENSITIVE_KEY}["']?\s*[=:]\s*["']?)[^\s"'&,;}}\]]+"""),
        rf"\1{MASK}",
    ),
)


class Redactor:
    """Pure text redaction: configured secret values first (longest first), then the generic shapes."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                # Raw, in URLs (both encodings), and inside repr()/str() of containers and exceptions.
                forms |= {
                    secret,
                    quote(secret, safe=""),
                    quote(secret),
                    quote_plus(secret),
                    repr(secret)[1:-1],
                }
        ordered = sorted(forms - {""}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


class RedactionFilter(logging.Filter):
    """Rewrites a record so that nothing secret is left in it. Idempotent; never raises."""

    _exceptions = logging.Formatter()

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if not getattr(record, _REDACTED, False):
                self._redact_message(record)
            for name, value in list(vars(record).items()):
                if name not in _STANDARD_ATTRIBUTES and isinstance(value, str):
                    setattr(record, name, self._redact(value))
        except Exception:  # a record that cannot be cleaned is emptied, never passed on
            _withhold(record)
        return True

    def _redact_message(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} % {record.args!r} (arguments do not match the format)"
        record.msg, record.args = self._redact(message), ()
        if record.exc_info:
            record.exc_text = self._exceptions.formatException(record.exc_info)
            record.exc_info = None  # the exception object itself may hold the secret
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        setattr(record, _REDACTED, True)


def _withhold(record: logging.LogRecord) -> None:
    record.msg, record.args = "(log record withheld: redaction failed)", ()
    record.exc_info = record.exc_text = record.stack_info = None
    for name in [name for name in vars(record) if name not in _STANDARD_ATTRIBUTES]:
        delattr(record, name)
    setattr(record, _REDACTED, True)


class _RedactingRecordFactory:
    def __init__(self, base: Callable[..., logging.LogRecord], redaction: RedactionFilter) -> None:
        self.base = base
        self._redaction = redaction

    def __call__(self, *args: object, **kwargs: object) -> logging.LogRecord:
        record = self.base(*args, **kwargs)
        self._redaction.filter(record)
        return record


# --- output ---------------------------------------------------------------------------------------------


class LineFormatter(logging.Formatter):
    """`2026-11-28 03:00:00 INFO [task=... target=... phase=...] message` (stderr), or without time and
    level for the journal, which stores both itself."""

    def __init__(self, *, timestamp_and_level: bool) -> None:
        head = "%(asctime)s %(levelname)s " if timestamp_and_level else ""
        super().__init__(f"{head}%(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        self._head = timestamp_and_level

    def formatMessage(self, record: logging.LogRecord) -> str:
        tags = " ".join(
            f"{label}={getattr(record, name)}" for name, label in _FIELDS if hasattr(record, name)
        )
        context = f"[{tags}] " if tags else ""
        head = f"{record.asctime} {record.levelname} " if self._head else ""
        return f"{head}{context}{record.message}"


def stderr_is_journal(environ: Mapping[str, str] = os.environ, fd: int = 2) -> bool:
    """systemd sets JOURNAL_STREAM=<dev>:<inode> of the stream it connected; it only counts if our fd
    is still that stream (a child with redirected stderr inherits the variable)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat(fd)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def setup_logging(
    level: str,
    *,
    instance: str,
    secrets: Iterable[str],
    identifier: str = "falcoria-worker",
    journal: bool | None = None,
    journal_sender: Callable[..., object] | None = None,
) -> None:
    """Configure the root logger. Calling it again replaces the previous configuration.

    `journal`: None detects journald from JOURNAL_STREAM. `journal_sender` replaces
    systemd.journal.send (tests).
    """
    redaction = RedactionFilter(Redactor(secrets))
    handler: logging.Handler
    if stderr_is_journal() if journal is None else journal:
        from systemd.journal import JournalHandler, send

        handler = JournalHandler(
            sender_function=journal_sender or send, SYSLOG_IDENTIFIER=identifier, INSTANCE=instance
        )
        handler.setFormatter(LineFormatter(timestamp_and_level=False))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(timestamp_and_level=True))
    handler.addFilter(ContextFilter())
    handler.addFilter(redaction)
    setattr(handler, _OURS, True)

    current = logging.getLogRecordFactory()
    base = current.base if isinstance(current, _RedactingRecordFactory) else current
    logging.setLogRecordFactory(_RedactingRecordFactory(base, redaction))

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # Library chatter (every AMQP frame, every HTTP connection) only when asked for with DEBUG.
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "DEBUG" else logging.WARNING)
    # The run loop checks AMQP heartbeats dozens of times a second; py-amqp logs each check at DEBUG.
    logging.getLogger("amqp.connection.Connection.heartbeat_tick").setLevel(logging.INFO)
    # Python warnings (urllib3's, deprecations) go through the same handlers instead of raw stderr.
    logging.captureWarnings(True)
