"""Helpers that drive a live `falcoria-worker run` through the test Tasker and read the outcome back:
task field sets for quick and deliberately slow scans, waits on Redis state, and Tasker's view of a
clean finish. Shared by tests/integration and tests/reliability."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.support.tasker import Tasker

# Our documented extension keys, all with TTLs: they outlive a task on purpose.
EXTENSION_KEYS = ("task:*:status", "fw:delivered:*", "fw:revoked:*", "fw:node:*", "fw:finished:*")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status(redis_server, task_id: str) -> dict[str, str]:
    return redis_server.client().hgetall(f"task:{task_id}:status")


def scan_fields(target, ports: str, **extra: Any) -> dict[str, Any]:
    fields = {
        "ip": target.ip,
        "open_ports_opts": f"-n --max-retries 1 -Pn -p {ports}",
        "service_opts": "-sV -Pn",
        "open_ports_str": ports.replace(",", " "),
    }
    return {**fields, **extra}


def slow_phase1(target) -> dict[str, Any]:
    """Phase 1 against the blackhole: every probe waits for its timeout, so it runs for a long time."""
    return scan_fields(target, "1-65535", open_ports_opts="-n -Pn --max-retries 5 -p 1-65535")


def slow_phase2(target) -> dict[str, Any]:
    """Phase 1 is quick; -sV --version-all against the banner services waits on probe timeouts."""
    return scan_fields(target, "21,22", service_opts="-sV --version-all -Pn")


def held_phase2(held) -> dict[str, Any]:
    """Phase 2 against the held listener (tests.support.netns.held_service): it runs until the test
    calls held.release(), so whatever the test does meanwhile finds the scan running, however loaded the
    machine. --version-all keeps nmap probing the silent port (minutes) instead of giving up on it."""
    port = str(*held.target.ports)
    return scan_fields(held.target, port, service_opts="-sV --version-all -Pn", timeout=600)


def wait_phase(redis_server, task_id: str, phase: str, worker) -> None:
    wait_until(lambda: status(redis_server, task_id).get("state") == phase and worker.nmap_pids(), what=phase)


def assert_clean_for_tasker(tasker: Tasker, project: str) -> None:
    wait_until(
        lambda: tasker.leftover_keys(ignore=("worker:*", *EXTENSION_KEYS)) == [], what="Tasker keys gone"
    )
    assert tasker.status(project)["active_or_queued"] == 0
