"""Celery task messages on the wire (contract §1.5), decoded without Celery or kombu.

Decoding is a trust boundary: anyone who can publish to the broker chooses the headers, the content type
and the body. Only JSON is accepted; kombu would also unpickle `application/x-python-serialize` (code
execution) or parse YAML, so those are refused with a reason instead of being handed to a deserialiser.
kombu's typed JSON values (`{"__type__": "uuid", "__value__": {"hex": ...}}`) are left as they are:
`model.parse_task` reads that form, and nothing else is ever turned into an object here.

Pure: stdlib only, no clock, no environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from falcoria_worker.errors import Rejected
from falcoria_worker.model import ScanTask, parse_task, valid_task_id

MAX_BODY_BYTES = 4 * 1024 * 1024  # a real scan message is a few KiB; open_ports_str is capped at 64 KiB

_JSON_TYPES = frozenset({"application/json"})
_UTF8_NAMES = frozenset({"utf-8", "utf8"})
# What kombu would otherwise deserialise, named in the refusal so an operator can see what was sent.
_NAMED_SERIALIZERS = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "yaml",
    "application/x-msgpack": "msgpack",
    "application/data": "raw bytes",
}


@dataclass(frozen=True)
class CeleryMessage:
    name: str
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]


def decode_task_message(
    headers: Mapping[str, Any] | None,
    body: bytes | str | list[Any] | dict[str, Any],
    content_type: str | None,
    content_encoding: str | None,
) -> CeleryMessage:
    """A Celery task message -> CeleryMessage; raises Rejected(reason) for anything else.

    Protocol 2 (what Tasker sends): the name and id are headers, the body is [args, kwargs, embed].
    Protocol 1 (Celery 3): the body is {"task", "id", "args", "kwargs"}. `body` may also arrive already
    decoded (a list or dict), as kombu hands it over when it has deserialised the payload itself.
    """
    header_map = dict(headers or {})
    payload = _payload(body, content_type, content_encoding)
    if "task" in header_map:
        return _protocol2(header_map, payload)
    if isinstance(payload, dict) and "task" in payload:
        return _protocol1(header_map, payload)
    raise Rejected("not a Celery task message: no task name in the headers or the body", field="task")


def _payload(
    body: bytes | str | list[Any] | dict[str, Any], content_type: str | None, content_encoding: str | None
) -> Any:
    if isinstance(body, list | dict):
        return body
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime not in _JSON_TYPES:
        kind = _NAMED_SERIALIZERS.get(mime)
        shown = f"{mime} ({kind})" if kind else repr(mime[:100]) if mime else "none"
        raise Rejected(
            f"content type {shown} refused: only application/json is accepted", field="content_type"
        )
    encoding = (content_encoding or "utf-8").strip().lower()
    if encoding not in _UTF8_NAMES:
        raise Rejected(f"content encoding {encoding[:40]!r} refused: only utf-8 is accepted", field="body")
    if isinstance(body, bytes | bytearray | memoryview):
        raw = bytes(body)
        if len(raw) > MAX_BODY_BYTES:
            raise Rejected(f"body of {len(raw)} bytes refused: at most {MAX_BODY_BYTES}", field="body")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected(f"body is not valid UTF-8 (byte {exc.start})", field="body") from None
    elif isinstance(body, str):
        if len(body) > MAX_BODY_BYTES:
            raise Rejected(f"body of {len(body)} characters refused: at most {MAX_BODY_BYTES}", field="body")
        text = body
    else:
        raise Rejected(f"body of type {type(body).__name__} refused", field="body")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and lone surrogates; RecursionError a pathologically deep body.
        raise Rejected(f"body is not JSON: {str(exc)[:120]}", field="body") from None


def _protocol2(headers: dict[str, Any], payload: Any) -> CeleryMessage:
    name = _name(headers.get("task"))
    task_id = _task_id(headers.get("id"))
    if not isinstance(payload, list) or len(payload) != 3:
        raise Rejected("protocol 2 body must be [args, kwargs, embed]", field="body")
    args, kwargs, _embed = payload
    return CeleryMessage(name, task_id, _args(args), _kwargs(kwargs), headers)


def _protocol1(headers: dict[str, Any], payload: dict[str, Any]) -> CeleryMessage:
    name = _name(payload.get("task"))
    task_id = _task_id(payload.get("id"))
    args = _args(payload.get("args", []))
    kwargs = _kwargs(payload.get("kwargs", {}))
    # Expose the same headers a protocol-2 message carries, so callers need not care which one came.
    merged = {**headers, "task": name, "id": task_id}
    return CeleryMessage(name, task_id, args, kwargs, merged)


def _name(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise Rejected("task name missing or not a short string", field="task")
    return value


def _task_id(value: object) -> str:
    if not valid_task_id(value):
        raise Rejected("task id missing or malformed", field="id")
    return value  # type: ignore[return-value]


def _args(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise Rejected(f"task args must be a list, got {type(value).__name__}", field="args")
    return value


def _kwargs(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Rejected(f"task kwargs must be an object, got {type(value).__name__}", field="kwargs")
    return value


SCAN_TASK = "project.nmap.scan"


@dataclass(frozen=True)
class Delivery:
    """One scan message as it came off the queue, decoded once: its bytes are kept, so it can be put back
    on the queue unchanged, and its decoding is carried with it (through the lease, into recovery).

    `task` is set for a valid scan task; otherwise `refusal` says why it is not one, or `name` is another
    task's. `payload` is the undecoded task argument, whose fields name Tasker's keys even when invalid."""

    body: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    task_id: str = ""  # a valid task id, or "" when the message has none
    name: str = ""
    task: ScanTask | None = None
    refusal: str | None = None
    payload: object = None

    @classmethod
    def from_kombu(cls, message: Any) -> Delivery:
        body = message.body
        return cls.decode(
            body,
            dict(message.headers or {}),
            {
                "content_type": message.content_type,
                "content_encoding": message.content_encoding,
                "correlation_id": message.properties.get("correlation_id"),
                "reply_to": message.properties.get("reply_to"),
                "priority": message.properties.get("priority", 0),
            },
        )

    @classmethod
    def decode(cls, body: bytes | str, headers: dict[str, Any], properties: dict[str, Any]) -> Delivery:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        kept = cls(text, headers, properties)
        try:
            decoded = decode_task_message(
                headers, body, properties.get("content_type"), properties.get("content_encoding")
            )
        except Rejected as exc:
            task_id = str(headers.get("id") or "")[:64]
            return replace(kept, task_id=task_id if valid_task_id(task_id) else "", refusal=exc.reason)
        kept = replace(kept, task_id=decoded.task_id, name=decoded.name)
        if decoded.name != SCAN_TASK:
            return kept
        payload = decoded.args[0] if len(decoded.args) == 1 else None
        try:
            return replace(kept, task=parse_task(payload), payload=payload)
        except Rejected as exc:
            return replace(kept, refusal=exc.reason, payload=payload)

    def dumps(self) -> str:
        # AMQP headers may carry types JSON lacks (timestamps, decimals, bytes); Celery's own headers are
        # JSON, so whatever else a publisher added is kept as text rather than refused.
        return json.dumps(
            {"body": self.body, "headers": self.headers, "properties": self.properties}, default=str
        )

    @classmethod
    def loads(cls, text: str | bytes) -> Delivery:
        """A delivery kept in a lease, decoded again the same way (its task is needed to finish it)."""
        data = json.loads(text)
        props = data["properties"]
        props = {
            **props,
            "content_type": props.get("content_type") or "application/json",
            "content_encoding": props.get("content_encoding") or "utf-8",
        }
        decoded = cls.decode(data["body"].encode("utf-8"), data["headers"], props)
        return replace(decoded, properties=data["properties"])
