"""The life of one scan task: its stages, the events that move it, and what each move asks to be done.

Pure: no I/O and no clock (the edge passes the time in). `step` is the only place that decides how a task
ends; everything that touches the world (Redis, the broker, nmap, the spool) carries out the returned
actions, and whatever reports on a task (the status in Redis, Tasker's keys, the journal, systemd STATUS)
observes the published `Transition`s.

    NEW --received--> INCOMING --leased--> LEASED --admitted--> RECEIVED --phase started--> PORTS_SCAN
    PORTS_SCAN --phase started--> SERVICE_SCAN --scanned--> SCANNED --stored--> ENDED(completed)
    any stage --refused/duplicate/revoked/poison/failed/cancelled/nmap killed--> ENDED(outcome)
    ENDED(completed) --delivered/delivery refused--> ENDED(completed), the delivery recorded

While a scan runs, `revoked`, `stopping`, `lease lost` and `fenced` only stop nmap and mark the task; how it
then ends is decided when the scan thread reports the end: taken over (another instance owns it now, or may
soon: a fenced task's lease went unrenewed too long), put back on the queue (our own stop), or the end the
scan reached.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from falcoria_worker.model import Phase, ScanTask
from falcoria_worker.protocol import Delivery


class Stage(StrEnum):
    NEW = "new"
    INCOMING = "incoming"  # decoded off the queue; nothing decided yet
    LEASED = "leased"  # our lease holds it; the engine has not checked it yet
    RECEIVED = "received"  # admitted: Tasker sees it on this host, nmap not started yet
    PORTS_SCAN = "ports_scan"
    SERVICE_SCAN = "service_scan"
    SCANNED = "scanned"  # the merged report exists, not yet durable
    ENDED = "ended"  # see TaskView.outcome


class TaskStatus(StrEnum):
    """The `state` field of `task:{id}:status`, as Tasker's side reads it."""

    QUEUED = "queued"
    RECEIVED = "received"
    PORTS_SCAN = "ports_scan"
    SERVICE_SCAN = "service_scan"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "queued"  # put back on the queue: to run again here or elsewhere
    TAKEN_OVER = "taken_over"  # another instance holds the lease now; nothing of it is ours
    DROPPED = "dropped"  # not ours to record: a duplicate, or not a scan task


class Event(StrEnum):
    RECEIVED = "received"
    IGNORED = "ignored"  # a well-formed message that is not a scan task
    DUPLICATE = "duplicate"
    LEASED = "leased"
    ADMITTED = "admitted"
    REFUSED = "refused"
    PHASE_STARTED = "phase_started"
    NMAP_STARTED = "nmap_started"
    PROGRESS = "progress"
    PHASE_DONE = "phase_done"
    NMAP_KILLED = "nmap_killed"  # by someone else (OOM killer, operator): not the task's fault
    REDIS_LOST = "redis_lost"  # mid-scan: not the task's fault either
    FAILED = "failed"
    CANCELLED = "cancelled"  # the scan thread saw its cancel
    REVOKED = "revoked"  # a cancel or revoke arrived
    STOPPING = "stopping"  # this instance stops
    SCANNED = "scanned"
    STORED = "stored"
    DELIVERED = "delivered"
    DELIVERY_REFUSED = "delivery_refused"
    LEASE_LOST = "lease_lost"
    # Our lease went unrenewed for a whole TTL (Redis unreachable, or the loop held up): it may have
    # expired, and another instance may requeue it from one more TTL on, so this copy stops before that.
    FENCED = "fenced"
    LEASE_EXPIRED = "lease_expired"  # found in Redis with nobody running it
    POISON = "poison"


class Do(StrEnum):
    ACK = "ack"
    MARK_RUNNING = "mark_running"  # Tasker's running entry of this host
    START_SCAN = "start_scan"
    STOP_NMAP = "stop_nmap"
    WRITE_PID = "write_pid"
    CLEAR_PID = "clear_pid"
    AWAIT_TRACKING = "await_tracking"  # Tasker writes its keys after publishing: wait before cleaning
    CLEAN_KEYS = "clean_keys"  # Tasker's cleanup (from the payload's fields when it did not parse)
    KEEP_LOCK = "keep_lock"  # ... but Tasker's lock is not ours to delete
    CLEAR_TRACES = "clear_traces"  # only this host's running entry and PIDs
    SPOOL_REPORT = "spool_report"
    WRITE_DELIVERY = "write_delivery"  # the status's delivery field only
    MARK_DELIVERED = "mark_delivered"
    WRITE_STATUS = "write_status"
    RELEASE_LEASE = "release_lease"
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Action:
    do: Do
    refund: bool = False  # REQUEUE: the attempt does not count (our own stop, not the task's fault)
    own_lease: bool = True  # REQUEUE: our lease, live or not; False: only an expired lease of anyone


@dataclass(frozen=True)
class TaskView:
    """Read-only snapshot of a task's record."""

    task_id: str
    task: ScanTask | None = None
    delivery: Delivery | None = None
    stage: Stage = Stage.NEW
    phase: Phase | None = None
    detail: str = "starting"
    percent: float | None = None
    error: str | None = None
    outcome: Outcome | None = None
    open_ports: int | None = None
    received_at: float | None = None
    started_at: float | None = None
    attempt: int = 0
    pid: int | None = None
    note: str | None = None  # the status's delivery field: "pending", "stored in ...", "delivered"
    stop_reason: str | None = None  # why nmap was told to stop, while the scan thread winds down
    stopping: bool = False
    lease_lost: bool = False
    fence: str | None = None  # why this instance gave the task up without hearing from Redis
    delivered: bool = False

    @property
    def ended(self) -> bool:
        return self.stage is Stage.ENDED

    @property
    def running(self) -> bool:
        return self.stage in _RUNNING


@dataclass(frozen=True)
class Transition:
    task_id: str
    event: Event
    before: Stage
    after: Stage
    actions: tuple[Action, ...]
    view: TaskView
    at: float

    def has(self, do: Do) -> bool:
        return any(action.do is do for action in self.actions)


class Observer(Protocol):
    def observe(self, transition: Transition) -> None: ...


class WorkerObserver(Protocol):
    """The instance's own life, for whatever reports on the worker rather than on one task."""

    def worker_started(self) -> None: ...
    def worker_ready(self) -> None: ...
    def consuming_changed(self, consuming: bool) -> None: ...
    def draining_changed(self, draining: bool) -> None: ...  # taking no new scans, by remote control
    def worker_stopping(self) -> None: ...


class Ticking(Protocol):
    def tick(self, now: float) -> None: ...  # every turn of the loop; `now` is time.monotonic()
    def next_due(self) -> float | None: ...  # when it needs the next turn (monotonic), None: no need


_RUNNING = frozenset({Stage.RECEIVED, Stage.PORTS_SCAN, Stage.SERVICE_SCAN, Stage.SCANNED})
_PHASE_STAGE = {Phase.PORTS: Stage.PORTS_SCAN, Phase.SERVICES: Stage.SERVICE_SCAN}
_ENDS = frozenset({Event.FAILED, Event.CANCELLED, Event.NMAP_KILLED, Event.REDIS_LOST})

ACK, STOP_NMAP = Action(Do.ACK), Action(Do.STOP_NMAP)
STATUS, RELEASE, CLEAN, KEEP_LOCK = (
    Action(Do.WRITE_STATUS),
    Action(Do.RELEASE_LEASE),
    Action(Do.CLEAN_KEYS),
    Action(Do.KEEP_LOCK),
)
CLEAR_TRACES = Action(Do.CLEAR_TRACES)
HANDED_BACK = "handed back at shutdown"


def new_task(task_id: str, delivery: Delivery | None = None, *, attempt: int = 0) -> TaskView:
    task = delivery.task if delivery is not None else None
    return TaskView(task_id=task_id, task=task, delivery=delivery, attempt=attempt)


def stored_task(task_id: str) -> TaskView:
    """A task known only as a stored report (the deliverer's side, which outlives the scan's record)."""
    return TaskView(task_id=task_id, stage=Stage.ENDED, outcome=Outcome.COMPLETED)


def status_value(view: TaskView) -> TaskStatus:
    """What the task's status says: its outcome once ended, else its stage (only stages and outcomes
    that ask for WRITE_STATUS are ever asked)."""
    return TaskStatus(view.outcome.value if view.outcome is not None else view.stage.value)


def step(
    view: TaskView,
    event: Event,
    at: float,
    *,
    phase: Phase | None = None,
    detail: str | None = None,
    percent: float | None = None,
    error: str | None = None,
    pid: int | None = None,
    open_ports: int | None = None,
    note: str | None = None,
    keep_lock: bool = False,
    own_lease: bool = True,
) -> Transition:
    """The task's next view and what to do, for `event` arriving at `at`. An event that does not apply
    to the stage changes nothing and asks for nothing."""
    after, actions = _decide(
        view,
        event,
        at,
        phase=phase,
        detail=detail,
        percent=percent,
        error=error,
        pid=pid,
        open_ports=open_ports,
        note=note,
        keep_lock=keep_lock,
        own_lease=own_lease,
    )
    return Transition(view.task_id, event, view.stage, after.stage, tuple(actions), after, at)


def _end(view: TaskView, outcome: Outcome, **changes: object) -> TaskView:
    return replace(view, stage=Stage.ENDED, outcome=outcome, pid=None, **changes)  # type: ignore[arg-type]


def _decide(  # noqa: PLR0911, PLR0912 - the one table of the task's life
    view: TaskView,
    event: Event,
    at: float,
    *,
    phase: Phase | None,
    detail: str | None,
    percent: float | None,
    error: str | None,
    pid: int | None,
    open_ports: int | None,
    note: str | None,
    keep_lock: bool,
    own_lease: bool,
) -> tuple[TaskView, list[Action]]:
    stage = view.stage
    if stage is Stage.ENDED:
        if view.outcome is not Outcome.COMPLETED or view.delivered:
            return view, []
        if event is Event.DELIVERED:
            return replace(view, delivered=True, note="delivered"), [
                Action(Do.MARK_DELIVERED),
                Action(Do.WRITE_DELIVERY),
            ]
        if event is Event.DELIVERY_REFUSED:
            return replace(view, note=f"refused by ScanLedger: {error}"), [Action(Do.WRITE_DELIVERY)]
        return view, []

    if stage is Stage.NEW:
        if event is Event.RECEIVED:
            return replace(view, stage=Stage.INCOMING, received_at=at), []
        if event is Event.IGNORED:
            return _end(view, Outcome.DROPPED), [ACK]
        if event is Event.REFUSED:  # not even a task id and a payload: only the status can tell
            status = [STATUS] if view.task_id else []
            return _end(view, Outcome.FAILED, error=f"rejected: {error}"), [*status, ACK]
        if event is Event.LEASE_EXPIRED:
            requeue = Action(Do.REQUEUE, own_lease=own_lease)
            return _end(view, Outcome.REQUEUED, error=error), [requeue]
        if event is Event.STORED:  # recovered at start: the report outlived the instance that made it
            if view.task is None:
                return _end(view, Outcome.COMPLETED, note=note), [RELEASE]
            return _end(view, Outcome.COMPLETED, note=note), [CLEAN, STATUS, RELEASE]
        return view, []

    if stage is Stage.INCOMING:
        if event is Event.REFUSED:
            return _end(view, Outcome.FAILED, error=f"rejected: {error}"), [STATUS, CLEAN, ACK]
        if event is Event.DUPLICATE:
            return _end(view, Outcome.DROPPED, error=error), [ACK]
        if event is Event.REVOKED:
            # Tasker's stop removed the lock already; a rescan may hold a new one by now.
            ended = _end(view, Outcome.CANCELLED, error="revoked before it started")
            return ended, [CLEAN, KEEP_LOCK, STATUS, ACK]
        if event is Event.POISON:
            return _end(view, Outcome.FAILED, error=error), _refused_with_lease()
        if event is Event.LEASED:
            return replace(view, stage=Stage.LEASED, attempt=view.attempt + 1), []
        return view, []

    if stage is Stage.LEASED:
        if event is Event.REFUSED:
            return _end(view, Outcome.FAILED, error=f"rejected: {error}"), _refused_with_lease()
        if event is Event.ADMITTED:
            admitted = replace(view, stage=Stage.RECEIVED, started_at=at)
            return admitted, [Action(Do.MARK_RUNNING), STATUS, Action(Do.START_SCAN), ACK]
        return view, []

    # A scan thread runs the task.
    if event is Event.REVOKED:
        return replace(view, stop_reason=view.stop_reason or "revoked"), [STOP_NMAP]
    if event is Event.STOPPING:
        return replace(view, stopping=True, stop_reason=view.stop_reason or "stopping"), [STOP_NMAP]
    if event is Event.LEASE_LOST:
        return replace(view, lease_lost=True, stop_reason="lease lost"), [STOP_NMAP]
    if event is Event.FENCED and stage is not Stage.SCANNED:
        # A report being stored now is not stopped: its upload waits for the lease's release instead.
        fence = f"fenced: {error}"
        return replace(view, lease_lost=True, fence=fence, stop_reason=fence), [STOP_NMAP]
    if event is Event.PHASE_STARTED and phase is not None and stage is not Stage.SCANNED:
        moved = replace(
            view, stage=_PHASE_STAGE[phase], phase=phase, detail=detail or view.detail, percent=None
        )
        return moved, [STATUS]
    if event is Event.PROGRESS and view.phase is not None:
        return replace(view, percent=percent), [STATUS]
    if event is Event.NMAP_STARTED:
        return replace(view, pid=pid), [Action(Do.WRITE_PID)]
    if event is Event.PHASE_DONE:
        return replace(view, pid=None), [Action(Do.CLEAR_PID)]
    if event in _ENDS or (event is Event.SCANNED and view.lease_lost):
        return _scan_end(view, event, error, keep_lock)
    if event is Event.SCANNED and stage is not Stage.SCANNED:
        scanned = replace(view, stage=Stage.SCANNED, open_ports=open_ports, error=error, pid=None)
        return scanned, [] if view.delivered else [Action(Do.SPOOL_REPORT)]
    if event is Event.STORED and stage is Stage.SCANNED:
        # Durable: from here on the task is finished, whatever happens to this process.
        ended = _end(view, Outcome.COMPLETED, note=note)
        write_delivery = [Action(Do.WRITE_DELIVERY)] if note == "pending" else []
        return ended, [*write_delivery, CLEAN, STATUS, RELEASE]
    return view, []


def _refused_with_lease() -> list[Action]:
    return [Action(Do.AWAIT_TRACKING), CLEAN, STATUS, RELEASE, ACK]


def _scan_end(
    view: TaskView, event: Event, error: str | None, keep_lock: bool
) -> tuple[TaskView, list[Action]]:
    """How a running scan ends. Our own stop or a lost lease wins over what the scan reached: the task is
    not ours to finish then."""
    if view.lease_lost:
        # No status either: it is written by whoever holds the lease now.
        error = view.fence or "another worker took the task over"
        return _end(view, Outcome.TAKEN_OVER, error=error), [CLEAR_TRACES]
    if view.stopping:
        ended = _end(view, Outcome.REQUEUED, error=HANDED_BACK)
        return ended, [CLEAR_TRACES, STATUS, Action(Do.REQUEUE, refund=True)]
    if event in (Event.NMAP_KILLED, Event.REDIS_LOST):
        # Through the lease, so the next claim counts an attempt (poison stays bounded).
        ended = _end(view, Outcome.REQUEUED, error=f"re-queued: {error}")
        return ended, [CLEAR_TRACES, STATUS, Action(Do.REQUEUE)]
    if event is Event.CANCELLED:
        ended = _end(view, Outcome.CANCELLED, error=error)
        return ended, [CLEAN, *([KEEP_LOCK] if keep_lock else []), STATUS, RELEASE]
    return _end(view, Outcome.FAILED, error=error), [CLEAN, STATUS, RELEASE]
