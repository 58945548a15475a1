"""The scan task as the worker sees it, and the parser that turns Tasker's payload (contract §2.1) into it.

Anyone who can publish to the broker writes this payload, so `parse_task` is a security boundary: every
field is type-checked exactly (a bool is not an int, a str is not a UUID), bounded in size and refused with
a reason that names the field. Option strings are only bounded here; `policy.check_options` judges them.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from falcoria_worker.errors import Rejected


class ImportMode(StrEnum):
    INSERT = "insert"
    REPLACE = "replace"
    UPDATE = "update"
    APPEND = "append"


class Phase(StrEnum):
    PORTS = "ports_scan"
    SERVICES = "service_scan"


PortRef = tuple[str, int]  # ("tcp", 80)


@dataclass(frozen=True, slots=True)
class TaskUser:
    id: str
    username: str


@dataclass(frozen=True, slots=True)
class ScanTask:
    ip: str  # canonical text (ipaddress.ip_address(x).compressed)
    hostnames: tuple[str, ...]
    project: str  # canonical lowercase UUID text "8-4-4-4-12"
    open_ports_opts: str
    service_opts: str
    timeout: int  # seconds, per phase, 1..86400
    include_services: bool
    mode: ImportMode
    user: TaskUser
    open_ports_str: str  # EXACTLY as received: it is part of Tasker's lock key
    track_history: bool

    @property
    def ip_version(self) -> int:
        return ipaddress.ip_address(self.ip).version


MAX_OPTS_LEN = 4096
MAX_HOSTNAMES = 256
MAX_HOSTNAME_LEN = 253
MAX_OPEN_PORTS_STR_LEN = 65536
MAX_USERNAME_LEN = 256
MAX_TIMEOUT = 86400
MAX_CANCEL_IDS = 10000
# Longest textual IPv6 address ("ffff:...:255.255.255.255"); anything longer is not an address.
MAX_IP_LEN = 45

_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}"
)
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
# A hostname only ever goes into the report, but it must still look like one: ASCII DNS characters, no
# leading '-' or '.', so it can never read as an option or a path anywhere downstream.
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Tasker always sends a UUID; pydantic also lets a plain str through, which ends up inside a Redis key.
_USER_ID_TEXT = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
# A task id becomes a Redis key part and a directory name (the scan's work dir, the spool entry), so it
# must start with a letter or digit: "." and ".." would name the directory itself or its parent.
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_IP_CHARS = re.compile(r"[0-9A-Fa-f:.]+")


def _type_name(value: object) -> str:
    return type(value).__name__


def _require(data: Mapping[str, object], key: str, prefix: str = "") -> object:
    if key not in data:
        raise Rejected(f"{prefix}{key}: missing", field=f"{prefix}{key}")
    return data[key]


def _text(value: object, field: str, max_len: int) -> str:
    """A str of at most `max_len` characters without control, format, surrogate or unassigned characters.

    Lone surrogates ("\\udcff") are what undecodable bytes become with surrogateescape; they are refused
    because they cannot be encoded back to UTF-8 for logs, Redis or XML."""
    if not isinstance(value, str):
        raise Rejected(f"{field}: expected a string, got {_type_name(value)}", field=field)
    if len(value) > max_len:
        raise Rejected(f"{field}: too long ({len(value)} characters, at most {max_len})", field=field)
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            raise Rejected(
                f"{field}: control or invalid character U+{ord(char):04X} at position {index}", field=field
            )
    return value


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise Rejected(f"{field}: expected true or false, got {_type_name(value)}", field=field)
    return value


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Rejected(f"{field}: expected an integer, got {_type_name(value)}", field=field)
    if not low <= value <= high:
        raise Rejected(f"{field}: {value} out of range {low}..{high}", field=field)
    return value


def _uuid(value: object, field: str) -> str:
    """uuid.UUID, UUID text, or kombu's typed JSON left undecoded -> canonical lowercase text."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        return _typed_uuid(value, field)
    if isinstance(value, str) and _UUID_TEXT.fullmatch(value):
        return str(uuid.UUID(value))
    raise Rejected(f"{field}: not a UUID", field=field)


def _typed_uuid(value: Mapping[object, object], field: str) -> str:
    # kombu >= 5.3 encodes uuid.UUID as {"__type__": "uuid", "__value__": {"hex": "<32 hex>"}} (§1.5).
    inner = value.get("__value__")
    if value.get("__type__") != "uuid" or not isinstance(inner, Mapping):
        raise Rejected(f"{field}: not a UUID (unknown typed value)", field=field)
    hex_text = inner.get("hex")
    if not isinstance(hex_text, str) or not _HEX32.fullmatch(hex_text):
        raise Rejected(f"{field}: not a UUID (bad hex in typed value)", field=field)
    return str(uuid.UUID(hex=hex_text))


def _ip(value: object) -> str:
    """One literal IPv4/IPv6 address, as canonical text. Hostnames, CIDRs, zone ids and anything that
    could read as an option are refused: the target is the last nmap argument."""
    text = _text(value, "ip", MAX_IP_LEN)
    if not _IP_CHARS.fullmatch(text):
        raise Rejected(
            f"ip: {text!r} is not an IP address (hostnames, CIDRs and zone ids are refused)", field="ip"
        )
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Rejected(f"ip: {text!r} is not an IP address", field="ip") from None
    return address.compressed


def _hostnames(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise Rejected(f"hostnames: expected a list, got {_type_name(value)}", field="hostnames")
    if len(value) > MAX_HOSTNAMES:
        raise Rejected(f"hostnames: {len(value)} entries, at most {MAX_HOSTNAMES}", field="hostnames")
    names = []
    for index, item in enumerate(value):
        field = f"hostnames[{index}]"
        name = _text(item, field, MAX_HOSTNAME_LEN)
        if not _HOSTNAME.fullmatch(name):
            raise Rejected(f"{field}: {name!r} is not a DNS name", field=field)
        names.append(name)
    return tuple(names)


def _mode(value: object) -> ImportMode:
    if not isinstance(value, str):
        raise Rejected(f"mode: expected a string, got {_type_name(value)}", field="mode")
    try:
        return ImportMode(value)
    except ValueError:
        allowed = ", ".join(mode.value for mode in ImportMode)
        raise Rejected(f"mode: unknown import mode (expected one of {allowed})", field="mode") from None


def _user(value: object) -> TaskUser:
    if not isinstance(value, Mapping):
        raise Rejected(f"user: expected an object, got {_type_name(value)}", field="user")
    raw_id = _require(value, "id", "user.")
    if isinstance(raw_id, str) and not _UUID_TEXT.fullmatch(raw_id):
        # A non-UUID id is part of the Redis key user:{id}:task_ids, so it is held to a key-safe alphabet.
        user_id = _text(raw_id, "user.id", 128)
        if not _USER_ID_TEXT.fullmatch(user_id):
            raise Rejected("user.id: not a UUID and not a plain identifier", field="user.id")
    else:
        user_id = _uuid(raw_id, "user.id")
    username = _text(_require(value, "username", "user."), "user.username", MAX_USERNAME_LEN)
    return TaskUser(id=user_id, username=username)


def parse_task(data: object) -> ScanTask:
    """Validate a `project.nmap.scan` payload. Unknown keys are ignored, as Tasker's pydantic model does."""
    if not isinstance(data, Mapping):
        raise Rejected(f"task: expected an object, got {_type_name(data)}", field="task")
    return ScanTask(
        ip=_ip(_require(data, "ip")),
        hostnames=_hostnames(data.get("hostnames", [])),
        project=_uuid(_require(data, "project"), "project"),
        open_ports_opts=_text(_require(data, "open_ports_opts"), "open_ports_opts", MAX_OPTS_LEN),
        service_opts=_text(_require(data, "service_opts"), "service_opts", MAX_OPTS_LEN),
        timeout=_int(_require(data, "timeout"), "timeout", 1, MAX_TIMEOUT),
        include_services=_bool(_require(data, "include_services"), "include_services"),
        mode=_mode(_require(data, "mode")),
        user=_user(_require(data, "user")),
        open_ports_str=_text(_require(data, "open_ports_str"), "open_ports_str", MAX_OPEN_PORTS_STR_LEN),
        # Tasker always sends true; an older payload without the key keeps ScanLedger's history on.
        track_history=_bool(data.get("track_history", True), "track_history"),
    )


def valid_task_id(text: object) -> bool:
    """Celery task ids are UUID text; anything id-like up to 64 characters is accepted, nothing that could
    break a Redis key, a log line or a path (no leading dot, no separators)."""
    return isinstance(text, str) and _TASK_ID.fullmatch(text) is not None


def parse_cancel(data: object) -> tuple[str, ...]:
    """`project.nmap.cancel` payload {"task_ids": [...]} -> the ids."""
    if not isinstance(data, Mapping):
        raise Rejected(f"cancel: expected an object, got {_type_name(data)}", field="task_ids")
    ids = _require(data, "task_ids")
    if not isinstance(ids, list | tuple):
        raise Rejected(f"task_ids: expected a list, got {_type_name(ids)}", field="task_ids")
    if len(ids) > MAX_CANCEL_IDS:
        raise Rejected(f"task_ids: {len(ids)} entries, at most {MAX_CANCEL_IDS}", field="task_ids")
    for index, task_id in enumerate(ids):
        if not valid_task_id(task_id):
            raise Rejected(f"task_ids[{index}]: not a task id", field=f"task_ids[{index}]")
    return tuple(ids)
