"""Case 6: hostile input through a live worker. The committed corpus (tests/corpus: option strings and
whole payloads) plus a hypothesis-generated sample of option strings that each carry a token no policy
may accept, published as Tasker does (tracked) or, for payloads, raw on the broker as any publisher
could. For every one: no nmap process ever starts, the task's status says `failed` with the reason, the
worker's log names the task with the reason, and the worker keeps serving.

The 12,500 generated cases at the validation layer run in tests/unit/test_fuzz_input.py; this case adds
the end-to-end path (decode, claim, prepare, janitor cleanup) for SAMPLE more."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.corpus import cases
from tests.reliability.kit import Figures, ProcessWatch, leaked_keys, wait_clean, wait_served
from tests.support.drive import scan_fields, status, wait_until
from tests.support.tasker import SCAN_TASK, celery_message
from tests.unit.test_fuzz_input import soup

pytestmark = pytest.mark.reliability

SAMPLE = 1000
MAX_OPTIONS = 4096  # model.py's limit: longer strings are refused for their length, before the policy
# Tokens that run code, read or write files, or change identity: refused wherever they stand.
MUST_REFUSE = [
    "--script=vuln", "-iL", "-iL/etc/shadow", "-oN/tmp/x", "-oX", "-oA", "--append-output", "--resume",
    "--datadir", "--servicedb", "--versiondb", "--stylesheet", "--excludefile", "-D", "-S", "-e", "-g",
    "-sI", "--spoof-mac", "--proxies", "--privileged", "-iR", "--script-args=a=b",
]  # fmt: skip
hostile_options = st.tuples(soup, st.sampled_from(MUST_REFUSE), soup).map(" ".join)


def generated_options(count: int) -> list[str]:
    """`count` option strings drawn by hypothesis (its shrinking is of no use here: nothing fails inside)."""
    drawn: list[str] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(hostile_options)
    def draw(options: str) -> None:
        drawn.append(options)

    draw()
    return drawn


def test_hostile_input_never_reaches_nmap(
    tasker, worker_factory, scanledger, netns_lab, redis_server, watch: ProcessWatch, figures: Figures
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    target = netns_lab.services
    expected: dict[str, str | None] = {}  # task id -> reason the status must contain (None: any refusal)

    def send_options(text: str, phase: str, reason: str | None) -> None:
        field = "open_ports_opts" if phase == "ports_scan" else "service_opts"
        task_id = tasker.send_scan(**scan_fields(target, "80", **{field: text}), project=uuid.uuid4())
        assert task_id is not None
        expected[task_id] = reason if len(text) <= MAX_OPTIONS else None

    for case in cases("hostile_options.json"):
        # Cases written for an operator's allowed scripts are refused here for an earlier reason.
        reason = None if case.get("allowed_scripts") else case["reason"]
        send_options(case["input"], case.get("phase", "ports_scan"), reason)
    sample = generated_options(SAMPLE)
    for i, text in enumerate(sample):
        send_options(text, "ports_scan" if i % 2 else "service_scan", None)
    figures.faults[f"{len(cases('hostile_options.json'))} corpus option strings"] += 1
    figures.faults[f"{len(sample)} generated option strings"] += 1

    # Forged payloads, published raw: nobody tracked them in Redis first.
    for case in cases("hostile_payloads.json"):
        task_id = str(uuid.uuid4())
        body, headers, properties = celery_message(
            SCAN_TASK, task_id, [case["input"]], origin="attacker@broker", reply_to=str(uuid.uuid4())
        )
        tasker.publish_raw(body, headers, properties)
        expected[task_id] = case["reason"]
    figures.faults[f"{len(cases('hostile_payloads.json'))} corpus payloads"] += 1

    def verdicts() -> dict[str, dict[str, str]]:
        return {task_id: status(redis_server, task_id) for task_id in expected}

    wait_until(
        lambda: all(s.get("state") == "failed" for s in verdicts().values()),
        timeout=600,
        what="a verdict on every hostile task",
    )
    unclear: list[tuple[str, Any]] = []
    for task_id, st_ in verdicts().items():
        error, reason = st_.get("error", ""), expected[task_id]
        # The payload check (model.py) sees option strings first: its own wording names the field.
        first = error.startswith(("rejected: open_ports_opts:", "rejected: service_opts:"))
        if not error.startswith("rejected: ") or (reason is not None and reason not in error and not first):
            unclear.append((task_id, error[:200], reason))
    assert unclear == []
    assert set(watch.nmap_tasks) & set(expected) == set(), "nmap ran for rejected input"
    log = worker.log()
    lines = [line for line in log.splitlines() if "rejected" in line]
    silent = [t for t in expected if not any(f"task={t}" in line for line in lines)]
    assert silent == []
    figures.tasks = len(expected)
    wait_clean(tasker, redis_server.client(), timeout=120)
    figures.leaked_keys = len(leaked_keys(tasker, redis_server.client()))
    assert figures.leaked_keys == 0, leaked_keys(tasker, redis_server.client())
    assert worker.alive() and worker.exits == []
    wait_served(tasker, [worker.nodename], redis_server, scan_fields(target, "80"), scanledger)
    # The one nmap that ran is the served check's own.
    assert len(watch.nmap_tasks) <= 1


def test_forged_messages_do_not_delay_tasker_cleanup(
    tasker, worker_factory, scanledger, netns_lab, redis_server, figures: Figures
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    forged = cases("hostile_payloads.json")[:30]
    for case in forged:
        body, headers, properties = celery_message(
            SCAN_TASK,
            str(uuid.uuid4()),
            [case["input"]],
            origin="attacker@broker",
            reply_to=str(uuid.uuid4()),
        )
        tasker.publish_raw(body, headers, properties)
    figures.faults[f"{len(forged)} forged payloads"] += 1
    project = uuid.uuid4()
    refused = tasker.send_scan(
        **scan_fields(netns_lab.services, "80", service_opts="-sV --script vuln"), project=project
    )
    good = tasker.send_scan(
        **scan_fields(netns_lab.services, "80"), project=uuid.UUID(scanledger.add_project())
    )
    wait_until(
        lambda: status(redis_server, good).get("state") == "completed", timeout=60, what="the good task"
    )
    # The refused task's verdict and Tasker's view of it (still counted active while the janitor sleeps).
    verdict = (status(redis_server, refused).get("state"), tasker.status(str(project))["active_or_queued"])
    assert verdict == ("failed", 0)
    assert worker.alive()
