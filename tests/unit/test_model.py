"""model.parse_task / parse_cancel / valid_task_id: Tasker's payload (contract §2.1) in every form it
arrives in, and the hostile corpus refused field by field."""

from __future__ import annotations

import copy
import sys
import uuid
from typing import Any

import pytest

from falcoria_worker.errors import Rejected
from falcoria_worker.lifecycle import TaskStatus as TaskState
from falcoria_worker.model import (
    ImportMode,
    Phase,
    ScanTask,
    TaskUser,
    parse_cancel,
    parse_task,
    valid_task_id,
)
from tests.corpus import cases, load

PROJECT = "a2783030-c0f7-4f4a-9b3e-1d2c3b4a5f60"
USER = "8ce86274-1b2a-4c5d-8e9f-0a1b2c3d4e5f"


def captured() -> dict[str, Any]:
    """The captured Tasker message of contract §1.5, with kombu's typed UUIDs left undecoded."""
    return copy.deepcopy(load("hostile_payloads.json")["base"])


def test_captured_message_parses_to_the_exact_task() -> None:
    assert parse_task(captured()) == ScanTask(
        ip="127.0.0.1",
        hostnames=("loopback.test",),
        project=PROJECT,
        open_ports_opts="-n --max-retries 1 -Pn -p 1,22,55432,56379,58000",
        service_opts="-sV -Pn",
        timeout=120,
        include_services=True,
        mode=ImportMode.APPEND,
        user=TaskUser(id=USER, username="admin"),
        open_ports_str="1 22 55432 56379 58000",
        track_history=True,
    )


@pytest.mark.parametrize(
    "form",
    [
        uuid.UUID(PROJECT),
        PROJECT,
        PROJECT.upper(),
        PROJECT.replace("-", ""),
        {"__type__": "uuid", "__value__": {"hex": PROJECT.replace("-", "").upper()}},
    ],
    ids=["uuid.UUID", "text", "upper-case text", "32 hex", "typed upper-case hex"],
)
def test_project_and_user_id_accept_every_uuid_form(form: object) -> None:
    payload = captured()
    payload["project"] = form
    payload["user"]["id"] = form
    task = parse_task(payload)
    assert task.project == PROJECT
    assert task.user.id == PROJECT


def test_plain_user_id_text_is_kept() -> None:
    payload = captured()
    payload["user"]["id"] = "admin-1"
    assert parse_task(payload).user.id == "admin-1"


@pytest.mark.parametrize(
    ("ip", "canonical", "version"),
    [
        ("127.0.0.1", "127.0.0.1", 4),
        ("2001:DB8:0:0::1", "2001:db8::1", 6),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1", 6),
        ("::1", "::1", 6),
        pytest.param(
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            6,
            # The canonical text comes from ipaddress, whose form of this address changed in Python 3.13;
            # Debian 13's build of the worker therefore writes other key names for it than Debian 12's.
            marks=pytest.mark.xfail(
                sys.version_info >= (3, 13), reason="Python 3.13 writes IPv4-mapped IPv6 dotted", strict=True
            ),
        ),
    ],
)
def test_ip_is_normalised_to_canonical_text(ip: str, canonical: str, version: int) -> None:
    payload = captured()
    payload["ip"] = ip
    task = parse_task(payload)
    assert task.ip == canonical
    assert task.ip_version == version


def test_open_ports_str_is_kept_exactly() -> None:
    # It is part of Tasker's lock key: normalising it would leave the lock behind.
    payload = captured()
    payload["open_ports_str"] = "  80 443  8080 1000-2000 "
    assert parse_task(payload).open_ports_str == "  80 443  8080 1000-2000 "


def test_defaults_and_unknown_keys() -> None:
    payload = captured()
    del payload["hostnames"]
    del payload["track_history"]
    payload["some_future_field"] = {"anything": [1, 2]}
    task = parse_task(payload)
    assert task.hostnames == ()
    assert task.track_history is True


@pytest.mark.parametrize("mode", ["insert", "replace", "update", "append"])
def test_every_import_mode(mode: str) -> None:
    payload = captured()
    payload["mode"] = mode
    assert parse_task(payload).mode is ImportMode(mode)


@pytest.mark.parametrize("timeout", [1, 1800, 86400])
def test_timeout_bounds_are_inclusive(timeout: int) -> None:
    payload = captured()
    payload["timeout"] = timeout
    assert parse_task(payload).timeout == timeout


def test_limits_are_inclusive() -> None:
    payload = captured()
    payload["hostnames"] = ["a" * 253] * 256
    payload["open_ports_opts"] = "-n" + " " * 4094
    payload["open_ports_str"] = "1" * 65536
    payload["user"]["username"] = "u" * 256
    task = parse_task(payload)
    assert len(task.hostnames) == 256
    assert len(task.open_ports_opts) == 4096


def test_tuple_hostnames_and_non_ascii_username_are_accepted() -> None:
    payload = captured()
    payload["hostnames"] = ("a.test", "_srv.b.test", "c.test.")
    payload["user"]["username"] = "Zoë"
    task = parse_task(payload)
    assert task.hostnames == ("a.test", "_srv.b.test", "c.test.")
    assert task.user.username == "Zoë"


@pytest.mark.parametrize("case", cases("hostile_payloads.json"), ids=lambda case: case["name"])
def test_hostile_payload_is_rejected_with_its_reason(case: dict[str, Any]) -> None:
    with pytest.raises(Rejected) as caught:
        parse_task(case["input"])
    assert case["reason"] in caught.value.reason


def test_rejection_names_the_field() -> None:
    payload = captured()
    payload["user"]["username"] = 5
    with pytest.raises(Rejected) as caught:
        parse_task(payload)
    assert caught.value.field == "user.username"


def test_enums_carry_the_wire_values() -> None:
    assert [state.value for state in TaskState] == [
        "queued", "received", "ports_scan", "service_scan", "completed", "failed", "cancelled",
    ]  # fmt: skip
    assert Phase.PORTS == "ports_scan"
    assert Phase.SERVICES == "service_scan"


def test_parse_cancel() -> None:
    ids = [str(uuid.UUID(int=1)), "celery-id_1.2:3"]
    assert parse_cancel({"task_ids": ids}) == tuple(ids)
    assert parse_cancel({"task_ids": []}) == ()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "cancel: expected an object"),
        ([{"task_ids": []}], "cancel: expected an object"),
        ({}, "task_ids: missing"),
        ({"task_ids": "abc"}, "task_ids: expected a list, got str"),
        ({"task_ids": ["ok", 5]}, "task_ids[1]: not a task id"),
        ({"task_ids": ["a b"]}, "task_ids[0]: not a task id"),
        ({"task_ids": ["x" * 65]}, "task_ids[0]: not a task id"),
        ({"task_ids": ["ok"] * 10001}, "task_ids: 10001 entries"),
    ],
)
def test_parse_cancel_refuses(data: object, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_cancel(data)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (str(uuid.UUID(int=7)), True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("id\n", False),
        ("id*", False),
        ("lock:project:x", True),
        (7, False),
        (None, False),
        ("\udcff", False),
        # a task id names directories: "." and ".." would be the state dir itself or its parent
        ("..", False),
        (".", False),
        (".hidden", False),
        ("-starts-like-an-option", False),
        ("a..b", True),
    ],
)
def test_valid_task_id(text: object, valid: bool) -> None:
    assert valid_task_id(text) is valid
