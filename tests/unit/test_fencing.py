"""Leases.fence on a clock the test drives: a running task whose lease Redis has not confirmed for a whole
LEASE_TTL is stopped, reported fenced, and never fenced twice. No Redis: the fence makes no call to it."""

from __future__ import annotations

from falcoria_worker import config
from falcoria_worker.identity import Identity
from falcoria_worker.leases import Leases
from falcoria_worker.lifecycle import Event, Outcome, Transition
from falcoria_worker.model import Phase
from falcoria_worker.observers import ObserverHub, StatusLine
from falcoria_worker.systemd_notify import Notifier
from falcoria_worker.tasks import TaskRecord
from tests.unit.test_lifecycle import NEW

TTL = 6


class Seen:
    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def observe(self, transition: Transition) -> None:
        self.transitions.append(transition)


def _leases() -> tuple[Leases, dict[str, TaskRecord], ObserverHub, Seen]:
    settings = config.parse({"HOSTNAME": "scanner1", "LEASE_TTL": str(TTL)})
    hub, seen, running = ObserverHub(), Seen(), {}
    hub.add(seen)
    leases = Leases(
        settings,
        None,  # type: ignore[arg-type] - the fence never calls Redis
        Identity.of(settings),
        hub,
        running,
        stored=lambda _task_id: False,
        cancel=lambda _ids, _source: None,
        register_ip=lambda: None,
    )
    return leases, running, hub, seen


def _scanning(hub: ObserverHub, task_id: str = "t1") -> TaskRecord:
    record = TaskRecord(NEW, hub)
    for event, detail in [
        (Event.RECEIVED, {}),
        (Event.LEASED, {}),
        (Event.ADMITTED, {}),
        (Event.PHASE_STARTED, {"phase": Phase.PORTS, "detail": "ports"}),
    ]:
        record.apply(event, **detail)
    return record


def test_a_lease_unrenewed_for_a_whole_ttl_fences_the_task_once() -> None:
    leases, running, hub, seen = _leases()
    record = running["t1"] = _scanning(hub)
    assert leases.fence_due() is None  # not seen yet: its clock starts at the first look
    leases.fence(100.0)
    assert leases.fence_due() == 100.0 + TTL
    leases.fence(100.0 + TTL - 0.1)
    assert not record.cancel.is_set()
    leases.fence(100.0 + TTL)
    assert record.cancel.is_set()
    assert record.view.fence == f"fenced: lease not renewed for {TTL} s"
    assert leases.fence_due() is None  # given up: nothing left to fence
    leases.fence(200.0)
    assert [t.event for t in seen.transitions].count(Event.FENCED) == 1
    ended = record.apply(Event.CANCELLED, error="cancelled")
    assert ended.view.outcome is Outcome.TAKEN_OVER


def test_status_says_fenced_until_redis_answers() -> None:
    leases, running, hub, _seen = _leases()
    line = StatusLine(Notifier())
    hub.add(line)
    running["t1"] = _scanning(hub)
    leases.fence(0.0)
    leases.fence(float(TTL))
    text = line.text(broker_down=None, redis_ok=False, scans=1)
    assert text == (
        "waiting for Redis; not taking new scans; 1 scan(s) continue; 1 scan(s) fenced: lease not renewed"
    )
    assert "fenced" not in line.text(broker_down=None, redis_ok=True, scans=0)
