"""lifecycle.step: every transition of the table, and the invariants over random event sequences."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from falcoria_worker.lifecycle import (
    Action,
    Do,
    Event,
    Outcome,
    Stage,
    TaskStatus,
    TaskView,
    new_task,
    status_value,
    step,
    stored_task,
)
from falcoria_worker.model import ImportMode, Phase, ScanTask, TaskUser
from falcoria_worker.protocol import SCAN_TASK, Delivery

TASK = ScanTask(
    ip="127.0.0.1",
    hostnames=(),
    project="a2783030-c0f7-4f4a-9b3e-1d2c3b4a5f60",
    open_ports_opts="-p 1-100",
    service_opts="-sV",
    timeout=60,
    include_services=True,
    mode=ImportMode.INSERT,
    user=TaskUser("u1", "alice"),
    open_ports_str="1-100",
    track_history=True,
)
DELIVERY = Delivery("{}", {}, {}, task_id="t1", name=SCAN_TASK, task=TASK)
NEW = new_task("t1", DELIVERY)


def _at(stage: Stage, **flags: object) -> TaskView:
    """A view of the task at `stage`, reached through the table itself."""
    path = {
        Stage.NEW: [],
        Stage.INCOMING: [(Event.RECEIVED, {})],
        Stage.LEASED: [(Event.RECEIVED, {}), (Event.LEASED, {})],
        Stage.RECEIVED: [(Event.RECEIVED, {}), (Event.LEASED, {}), (Event.ADMITTED, {})],
    }
    running = path[Stage.RECEIVED]
    path[Stage.PORTS_SCAN] = [*running, (Event.PHASE_STARTED, {"phase": Phase.PORTS, "detail": "ports"})]
    path[Stage.SERVICE_SCAN] = [
        *path[Stage.PORTS_SCAN],
        (Event.PHASE_STARTED, {"phase": Phase.SERVICES, "detail": "services"}),
    ]
    path[Stage.SCANNED] = [*path[Stage.SERVICE_SCAN], (Event.SCANNED, {"open_ports": 2})]
    view = NEW
    for event, detail in path[stage]:
        view = step(view, event, 1.0, **detail).view  # type: ignore[arg-type]
    assert view.stage is stage
    return replace(view, **flags)  # type: ignore[arg-type]


A = Do
FINISH = [A.CLEAN_KEYS, A.WRITE_STATUS, A.RELEASE_LEASE]
REFUSED_LEASED = [A.AWAIT_TRACKING, *FINISH, A.ACK]
RUNNING = (Stage.RECEIVED, Stage.PORTS_SCAN, Stage.SERVICE_SCAN, Stage.SCANNED)

# (stage, flags, event, detail) -> (stage after, outcome, actions)
TABLE: list[tuple[Stage, dict, Event, dict, Stage, Outcome | None, list[Do]]] = [
    (Stage.NEW, {}, Event.RECEIVED, {}, Stage.INCOMING, None, []),
    (Stage.NEW, {}, Event.IGNORED, {}, Stage.ENDED, Outcome.DROPPED, [A.ACK]),
    (Stage.NEW, {}, Event.REFUSED, {"error": "x"}, Stage.ENDED, Outcome.FAILED, [A.WRITE_STATUS, A.ACK]),
    (Stage.NEW, {"task_id": ""}, Event.REFUSED, {"error": "x"}, Stage.ENDED, Outcome.FAILED, [A.ACK]),
    (Stage.NEW, {}, Event.LEASE_EXPIRED, {}, Stage.ENDED, Outcome.REQUEUED, [A.REQUEUE]),
    (Stage.NEW, {}, Event.STORED, {}, Stage.ENDED, Outcome.COMPLETED, FINISH),
    (Stage.NEW, {"task": None}, Event.STORED, {}, Stage.ENDED, Outcome.COMPLETED, [A.RELEASE_LEASE]),
    (Stage.INCOMING, {}, Event.REFUSED, {"error": "x"}, Stage.ENDED, Outcome.FAILED,
     [A.WRITE_STATUS, A.CLEAN_KEYS, A.ACK]),
    (Stage.INCOMING, {}, Event.DUPLICATE, {}, Stage.ENDED, Outcome.DROPPED, [A.ACK]),
    (Stage.INCOMING, {}, Event.REVOKED, {}, Stage.ENDED, Outcome.CANCELLED,
     [A.CLEAN_KEYS, A.KEEP_LOCK, A.WRITE_STATUS, A.ACK]),
    (Stage.INCOMING, {}, Event.POISON, {"error": "x"}, Stage.ENDED, Outcome.FAILED, REFUSED_LEASED),
    (Stage.INCOMING, {}, Event.LEASED, {}, Stage.LEASED, None, []),
    (Stage.LEASED, {}, Event.REFUSED, {"error": "x"}, Stage.ENDED, Outcome.FAILED, REFUSED_LEASED),
    (Stage.LEASED, {}, Event.ADMITTED, {}, Stage.RECEIVED, None,
     [A.MARK_RUNNING, A.WRITE_STATUS, A.START_SCAN, A.ACK]),
    (Stage.RECEIVED, {}, Event.PHASE_STARTED, {"phase": Phase.PORTS}, Stage.PORTS_SCAN, None,
     [A.WRITE_STATUS]),
    (Stage.PORTS_SCAN, {}, Event.PHASE_STARTED, {"phase": Phase.SERVICES}, Stage.SERVICE_SCAN, None,
     [A.WRITE_STATUS]),
    (Stage.PORTS_SCAN, {}, Event.PROGRESS, {"percent": 5.0}, Stage.PORTS_SCAN, None, [A.WRITE_STATUS]),
    (Stage.PORTS_SCAN, {}, Event.NMAP_STARTED, {"pid": 7}, Stage.PORTS_SCAN, None, [A.WRITE_PID]),
    (Stage.PORTS_SCAN, {}, Event.PHASE_DONE, {}, Stage.PORTS_SCAN, None, [A.CLEAR_PID]),
    (Stage.PORTS_SCAN, {}, Event.REVOKED, {}, Stage.PORTS_SCAN, None, [A.STOP_NMAP]),
    (Stage.PORTS_SCAN, {}, Event.STOPPING, {}, Stage.PORTS_SCAN, None, [A.STOP_NMAP]),
    (Stage.PORTS_SCAN, {}, Event.LEASE_LOST, {}, Stage.PORTS_SCAN, None, [A.STOP_NMAP]),
    (Stage.SERVICE_SCAN, {}, Event.SCANNED, {}, Stage.SCANNED, None, [A.SPOOL_REPORT]),
    (Stage.SERVICE_SCAN, {"lease_lost": True}, Event.SCANNED, {}, Stage.ENDED, Outcome.TAKEN_OVER,
     [A.CLEAR_TRACES]),
    (Stage.SCANNED, {}, Event.STORED, {"note": "pending"}, Stage.ENDED, Outcome.COMPLETED,
     [A.WRITE_DELIVERY, *FINISH]),
    (Stage.SCANNED, {}, Event.STORED, {"note": "nothing to import"}, Stage.ENDED, Outcome.COMPLETED, FINISH),
    (Stage.PORTS_SCAN, {}, Event.NMAP_KILLED, {"error": "x"}, Stage.ENDED, Outcome.REQUEUED,
     [A.CLEAR_TRACES, A.WRITE_STATUS, A.REQUEUE]),
    (Stage.PORTS_SCAN, {}, Event.REDIS_LOST, {"error": "x"}, Stage.ENDED, Outcome.REQUEUED,
     [A.CLEAR_TRACES, A.WRITE_STATUS, A.REQUEUE]),
    (Stage.PORTS_SCAN, {}, Event.CANCELLED, {"error": "x"}, Stage.ENDED, Outcome.CANCELLED, FINISH),
    (Stage.RECEIVED, {}, Event.CANCELLED, {"keep_lock": True}, Stage.ENDED, Outcome.CANCELLED,
     [A.CLEAN_KEYS, A.KEEP_LOCK, A.WRITE_STATUS, A.RELEASE_LEASE]),
    (Stage.PORTS_SCAN, {}, Event.FAILED, {"error": "x"}, Stage.ENDED, Outcome.FAILED, FINISH),
    (Stage.PORTS_SCAN, {"stopping": True}, Event.CANCELLED, {}, Stage.ENDED, Outcome.REQUEUED,
     [A.CLEAR_TRACES, A.WRITE_STATUS, A.REQUEUE]),
    (Stage.PORTS_SCAN, {"stopping": True}, Event.FAILED, {}, Stage.ENDED, Outcome.REQUEUED,
     [A.CLEAR_TRACES, A.WRITE_STATUS, A.REQUEUE]),
    (Stage.PORTS_SCAN, {"lease_lost": True}, Event.CANCELLED, {}, Stage.ENDED, Outcome.TAKEN_OVER,
     [A.CLEAR_TRACES]),
    # A scan that reached its end as the stop came is finished, not handed back: its report is delivered.
    (Stage.SERVICE_SCAN, {"stopping": True}, Event.SCANNED, {}, Stage.SCANNED, None, [A.SPOOL_REPORT]),
    (Stage.SCANNED, {"stopping": True}, Event.STORED, {"note": "pending"}, Stage.ENDED, Outcome.COMPLETED,
     [A.WRITE_DELIVERY, *FINISH]),
    (Stage.PORTS_SCAN, {"lease_lost": True, "stopping": True}, Event.NMAP_KILLED, {}, Stage.ENDED,
     Outcome.TAKEN_OVER, [A.CLEAR_TRACES]),
    # Fenced: nmap stops at once, and whatever the scan reaches is dropped without a status of ours.
    (Stage.PORTS_SCAN, {}, Event.FENCED, {"error": "x"}, Stage.PORTS_SCAN, None, [A.STOP_NMAP]),
    (Stage.RECEIVED, {}, Event.FENCED, {"error": "x"}, Stage.RECEIVED, None, [A.STOP_NMAP]),
    (Stage.SERVICE_SCAN, {"fence": "fenced: x", "lease_lost": True}, Event.SCANNED, {}, Stage.ENDED,
     Outcome.TAKEN_OVER, [A.CLEAR_TRACES]),
    (Stage.SERVICE_SCAN, {"fence": "fenced: x", "lease_lost": True}, Event.CANCELLED, {}, Stage.ENDED,
     Outcome.TAKEN_OVER, [A.CLEAR_TRACES]),
    # A report already being stored is left alone: its upload waits for the lease instead.
    (Stage.SCANNED, {}, Event.FENCED, {"error": "x"}, Stage.SCANNED, None, []),
    (Stage.LEASED, {}, Event.FENCED, {"error": "x"}, Stage.LEASED, None, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "flags", "event", "detail", "after", "outcome", "actions"),
    TABLE,
    ids=[f"{row[0].value}-{row[2].value}-{i}" for i, row in enumerate(TABLE)],
)
def test_transition_table(
    stage: Stage,
    flags: dict,
    event: Event,
    detail: dict,
    after: Stage,
    outcome: Outcome | None,
    actions: list[Do],
) -> None:
    t = step(_at(stage, **flags), event, 2.0, **detail)
    assert (t.before, t.after, t.view.outcome) == (stage, after, outcome)
    assert [a.do for a in t.actions] == actions
    assert t.task_id == flags.get("task_id", "t1") and t.at == 2.0 and t.view.stage is after


def test_the_attempt_counts_leases_and_the_times_are_the_edges() -> None:
    incoming = step(NEW, Event.RECEIVED, 10.0).view
    assert incoming.received_at == 10.0
    leased = step(incoming, Event.LEASED, 11.0).view
    assert leased.attempt == 1
    assert step(leased, Event.ADMITTED, 12.0).view.started_at == 12.0


def test_requeues_say_whose_lease_and_whether_the_attempt_counts() -> None:
    assert step(NEW, Event.LEASE_EXPIRED, 1.0, own_lease=False).actions == (
        Action(Do.REQUEUE, own_lease=False),
    )
    stopping = _at(Stage.PORTS_SCAN, stopping=True)
    assert Action(Do.REQUEUE, refund=True) in step(stopping, Event.CANCELLED, 1.0).actions
    assert Action(Do.REQUEUE) in step(_at(Stage.PORTS_SCAN), Event.NMAP_KILLED, 1.0).actions


def test_status_values_and_errors_written() -> None:
    assert status_value(_at(Stage.RECEIVED)) is TaskStatus.RECEIVED
    assert status_value(_at(Stage.SERVICE_SCAN)) is TaskStatus.SERVICE_SCAN
    handed_back = step(_at(Stage.PORTS_SCAN, stopping=True), Event.FAILED, 1.0).view
    assert (status_value(handed_back), handed_back.error) == (TaskStatus.QUEUED, "handed back at shutdown")
    killed = step(_at(Stage.PORTS_SCAN), Event.NMAP_KILLED, 1.0, error="nmap was killed by signal 9").view
    assert killed.error == "re-queued: nmap was killed by signal 9"
    refused = step(_at(Stage.LEASED), Event.REFUSED, 1.0, error="bad option").view
    assert refused.error == "rejected: bad option"
    revoked = step(_at(Stage.INCOMING), Event.REVOKED, 1.0).view
    assert revoked.error == "revoked before it started"


def test_delivery_of_a_stored_task() -> None:
    delivered = step(stored_task("t1"), Event.DELIVERED, 1.0)
    assert [a.do for a in delivered.actions] == [Do.MARK_DELIVERED, Do.WRITE_DELIVERY]
    assert delivered.view.note == "delivered"
    refused = step(stored_task("t1"), Event.DELIVERY_REFUSED, 1.0, error="422")
    assert refused.view.note == "refused by ScanLedger: 422"
    assert step(delivered.view, Event.DELIVERED, 2.0).actions == ()


def test_events_that_do_not_apply_change_nothing() -> None:
    for stage in (Stage.NEW, Stage.INCOMING, Stage.LEASED):
        view = _at(stage)
        t = step(view, Event.PROGRESS, 1.0, percent=3.0)
        assert (t.view, t.actions) == (view, ())
    ended = step(_at(Stage.PORTS_SCAN), Event.FAILED, 1.0).view
    for event in Event:
        assert step(ended, event, 2.0).actions == ()


# ---------------------------------------------------------------------------- invariants

DETAILS = st.fixed_dictionaries(
    {},
    optional={
        "phase": st.sampled_from(Phase),
        "percent": st.floats(0, 100),
        "error": st.text(max_size=5),
        "pid": st.integers(1, 99),
        "note": st.sampled_from(["pending", "nothing to import"]),
        "keep_lock": st.booleans(),
        "own_lease": st.booleans(),
    },
)
EVENTS = st.lists(st.tuples(st.sampled_from(Event), DETAILS), max_size=30)
STARTS = st.sampled_from([NEW, new_task("t1"), new_task(""), stored_task("t1")])
CLOSING = [(Event.REFUSED, {}), (Event.FAILED, {})]  # ends a task from any stage


@settings(max_examples=400, deadline=None)
@given(start=STARTS, events=EVENTS)
def test_every_task_ends_in_exactly_one_outcome(start: TaskView, events: list) -> None:
    view, entered, outcomes = start, 0, set()
    for event, detail in [*events, *CLOSING]:
        t = step(view, event, 1.0, **detail)
        entered += t.before is not Stage.ENDED and t.after is Stage.ENDED
        view = t.view
        if view.ended:
            outcomes.add(view.outcome)
    assert view.ended
    assert entered == (0 if start.ended else 1)
    assert len(outcomes) == 1


@settings(max_examples=400, deadline=None)
@given(start=STARTS, events=EVENTS)
def test_no_action_list_both_requeues_and_cleans(start: TaskView, events: list) -> None:
    view = start
    for event, detail in events:
        t = step(view, event, 1.0, **detail)
        kinds = {a.do for a in t.actions}
        assert not ({Do.REQUEUE} <= kinds and kinds & {Do.CLEAN_KEYS, Do.RELEASE_LEASE})
        view = t.view


@settings(max_examples=400, deadline=None)
@given(
    stage=st.sampled_from(RUNNING),
    events=EVENTS,
)
def test_a_delivered_report_is_never_spooled_again(stage: Stage, events: list) -> None:
    view = _at(stage, delivered=True)
    for event, detail in events:
        t = step(view, event, 1.0, **detail)
        assert not t.has(Do.SPOOL_REPORT)
        view = t.view
    stored = stored_task("t1")
    for event, detail in [(Event.DELIVERED, {}), *events]:
        t = step(stored, event, 1.0, **detail)
        assert not t.has(Do.SPOOL_REPORT)
        stored = t.view


def test_a_fenced_scan_ends_taken_over_with_the_fence_as_its_reason() -> None:
    fenced = step(_at(Stage.PORTS_SCAN), Event.FENCED, 1.0, error="lease not renewed for 6 s").view
    assert fenced.lease_lost and fenced.stop_reason == "fenced: lease not renewed for 6 s"
    ended = step(fenced, Event.CANCELLED, 2.0, error="cancelled")
    assert ended.view.outcome is Outcome.TAKEN_OVER
    assert ended.view.error == "fenced: lease not renewed for 6 s"
    assert not ended.has(Do.WRITE_STATUS) and not ended.has(Do.SPOOL_REPORT)
    assert not ended.has(Do.RELEASE_LEASE) and not ended.has(Do.REQUEUE)
