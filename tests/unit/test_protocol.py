"""protocol.py against the scan message captured from the real Tasker (contract §1.5)."""

from __future__ import annotations

import json
import pickle
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from falcoria_worker.errors import Rejected
from falcoria_worker.model import parse_task
from falcoria_worker.protocol import MAX_BODY_BYTES, decode_task_message
from tests.support.tasker import celery_message

# Contract §1.5 prints the two UUIDs shortened ("a2783030…", "8ce86274…"); they are completed here with
# arbitrary hex, everything else is the captured text byte for byte.
PROJECT = uuid.UUID("a2783030-5c1e-4f0b-9d36-2f4a8e1b7c90")
USER = uuid.UUID("8ce86274-1b2d-4c3e-8f4a-5b6c7d8e9f01")
TASK_ID = "5f0c5a8e-2b7d-4d8a-9a51-0f3c2e1d4b6a"
CAPTURED_BODY = (
    '[[{"ip": "127.0.0.1", "hostnames": ["loopback.test"], '
    '"project": {"__type__": "uuid", "__value__": {"hex": "' + PROJECT.hex + '"}}, '
    '"open_ports_opts": "-n --max-retries 1 -Pn -p 1,22,55432,56379,58000", "service_opts": "-sV -Pn", '
    '"timeout": 120, "include_services": true, "mode": "append", '
    '"user": {"id": {"__type__": "uuid", "__value__": {"hex": "' + USER.hex + '"}}, "username": "admin"}, '
    '"open_ports_str": "1 22 55432 56379 58000", "track_history": true}], {}, '
    '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
).encode()
CAPTURED_HEADERS = {
    "lang": "py",
    "task": "project.nmap.scan",
    "id": TASK_ID,
    "root_id": TASK_ID,
    "parent_id": None,
    "group": None,
    "retries": 0,
    "timelimit": [None, None],
    "eta": None,
    "expires": None,
    "ignore_result": False,
    "argsrepr": "[{...}]",
    "kwargsrepr": "{}",
    "origin": "gen4242@tasker",
    "stamped_headers": None,
    "stamps": {},
    "replaced_task_nesting": 0,
}
# What Tasker's model_dump() hands to send_task: UUID objects, which kombu turns into the typed form.
TASK_ARGS = {
    "ip": "127.0.0.1",
    "hostnames": ["loopback.test"],
    "project": PROJECT,
    "open_ports_opts": "-n --max-retries 1 -Pn -p 1,22,55432,56379,58000",
    "service_opts": "-sV -Pn",
    "timeout": 120,
    "include_services": True,
    "mode": "append",
    "user": {"id": USER, "username": "admin"},
    "open_ports_str": "1 22 55432 56379 58000",
    "track_history": True,
}


def decode(
    body: object = CAPTURED_BODY,
    headers: object = None,
    ctype: object = "application/json",
    enc: object = "utf-8",
):
    return decode_task_message(CAPTURED_HEADERS if headers is None else headers, body, ctype, enc)  # type: ignore[arg-type]


def test_captured_scan_message_decodes_and_parses() -> None:
    msg = decode()
    assert msg.name == "project.nmap.scan"
    assert msg.task_id == TASK_ID
    assert msg.kwargs == {}
    assert len(msg.args) == 1
    # The typed UUID stays as kombu wrote it; parse_task reads that form.
    assert msg.args[0]["project"] == {"__type__": "uuid", "__value__": {"hex": PROJECT.hex}}
    task = parse_task(msg.args[0])
    assert task.project == str(PROJECT)
    assert task.user.id == str(USER)
    assert task.open_ports_str == "1 22 55432 56379 58000"
    assert msg.headers["origin"] == "gen4242@tasker"


@pytest.mark.parametrize(
    "body", [CAPTURED_BODY, CAPTURED_BODY.decode(), json.loads(CAPTURED_BODY), bytearray(CAPTURED_BODY)]
)
def test_body_as_bytes_text_or_already_decoded(body: object) -> None:
    assert decode(body).args == decode().args


def test_charset_parameter_and_missing_encoding_accepted() -> None:
    assert decode(ctype="application/json; charset=utf-8").task_id == TASK_ID
    assert decode(enc=None).task_id == TASK_ID
    assert decode(enc="UTF8").task_id == TASK_ID


def test_cancel_and_update_ip_bodies() -> None:
    cancel = decode(
        b'[[{"task_ids": ["a", "b"]}], {}, '
        b'{"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
        headers={**CAPTURED_HEADERS, "task": "project.nmap.cancel"},
    )
    assert (cancel.name, cancel.args) == ("project.nmap.cancel", [{"task_ids": ["a", "b"]}])
    update = decode(b"[[], {}, {}]", headers={**CAPTURED_HEADERS, "task": "worker.update_ip"})
    assert (update.name, update.args, update.kwargs) == ("worker.update_ip", [], {})


def test_protocol_1_body_is_tolerated() -> None:
    body = json.dumps({"task": "project.nmap.scan", "id": TASK_ID, "args": [{"x": 1}], "kwargs": {}})
    msg = decode(body.encode(), headers={})
    assert (msg.name, msg.task_id, msg.args) == ("project.nmap.scan", TASK_ID, [{"x": 1}])
    assert msg.headers["task"] == "project.nmap.scan"
    assert msg.headers["id"] == TASK_ID


@pytest.mark.parametrize(
    ("ctype", "word"),
    [
        ("application/x-python-serialize", "pickle"),
        ("application/x-yaml", "yaml"),
        ("application/x-msgpack", "msgpack"),
        ("application/data", "raw"),
        ("text/plain", "text/plain"),
        (None, "none"),
        ("", "none"),
    ],
)
def test_other_serializers_are_refused_without_deserialising(ctype: str | None, word: str) -> None:
    # A pickle that would run code if anything unpickled it.
    evil = pickle.dumps(eval)  # only a reference to eval is pickled; nothing runs here
    with pytest.raises(Rejected) as info:
        decode(evil, ctype=ctype)
    assert word in info.value.reason
    assert info.value.field == "content_type"


def test_non_utf8_body_and_other_encodings_are_refused() -> None:
    with pytest.raises(Rejected, match="not valid UTF-8"):
        decode(b'[["\xff"], {}, {}]')
    with pytest.raises(Rejected, match="encoding 'latin-1' refused"):
        decode(enc="latin-1")
    with pytest.raises(Rejected, match="encoding 'binary' refused"):
        decode(enc="binary")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'[["\\ud800"], {}, {}]', None),  # a lone surrogate escape is valid JSON text; accepted
        (b"[[], {}]", "must be \\[args, kwargs, embed\\]"),
        (b'{"args": []}', "must be \\[args, kwargs, embed\\]"),
        (b'["x", {}, {}]', "args must be a list"),
        (b"[[], [], {}]", "kwargs must be an object"),
        (b"[[], {}, {}]" + b" " * MAX_BODY_BYTES, "at most"),
        (b"[[1" + b"0" * 5000 + b"], {}, {}]", "not JSON"),  # beyond Python's int digit limit
    ],
)
def test_malformed_bodies_are_refused(body: bytes, reason: str | None) -> None:
    if reason is None:
        assert decode(body).args == ["\ud800"]
        return
    with pytest.raises(Rejected, match=reason):
        decode(body)


@pytest.mark.parametrize(
    "headers",
    [
        {**CAPTURED_HEADERS, "id": "../../etc/passwd"},
        {**CAPTURED_HEADERS, "id": "x" * 65},
        {**CAPTURED_HEADERS, "id": None},
        {**CAPTURED_HEADERS, "id": 42},
        {**CAPTURED_HEADERS, "task": ""},
        {**CAPTURED_HEADERS, "task": 7},
        {"lang": "py"},
    ],
)
def test_bad_headers_are_refused(headers: dict) -> None:
    with pytest.raises(Rejected):
        decode(headers=headers)


def test_a_message_as_celery_sends_it_round_trips() -> None:
    # The test Tasker builds messages exactly as Celery's send_task does (checked against Celery itself
    # in tests/integration/test_tasker_wire.py); the worker requeues raw messages, so it encodes none.
    body, headers, props = celery_message(
        "project.nmap.scan", TASK_ID, [TASK_ARGS], origin="gen4242@tasker", reply_to="r-1"
    )
    msg = decode_task_message(headers, body, props["content_type"], props["content_encoding"])
    assert (msg.name, msg.task_id, msg.kwargs) == ("project.nmap.scan", TASK_ID, {})
    assert parse_task(msg.args[0]).project == str(PROJECT)


@given(
    headers=st.dictionaries(st.sampled_from(["task", "id", "lang"]), st.none() | st.text(max_size=70)),
    body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
    ctype=st.sampled_from(["application/json", "application/x-python-serialize", None]),
)
def test_decode_fails_only_with_rejected(headers: dict, body: bytes, ctype: str | None) -> None:
    try:
        msg = decode_task_message(headers, body, ctype, "utf-8")
    except Rejected as exc:
        assert exc.reason
    else:
        assert isinstance(msg.args, list)
        assert isinstance(msg.kwargs, dict)
