"""Celery control replies, Celery event fields and the Prometheus textfile, without a broker: the
pure parts of celery_control, celery_events and metrics (their wire behaviour is in
tests/integration/test_celery_ecosystem.py)."""

from __future__ import annotations

import os
import stat
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from celery.worker.control import Panel
from kombu import Connection
from prometheus_client.parser import text_string_to_metric_families

from falcoria_worker import broker, config
from falcoria_worker.celery_control import ControlPanel, Snapshot, payload
from falcoria_worker.celery_events import CeleryEvents, end_event, received_fields, scan_result
from falcoria_worker.lifecycle import Event, Outcome, Stage, TaskView, new_task, step, stored_task
from falcoria_worker.metrics import SETTLE, WRITE_INTERVAL, Metrics, rejection_reason, textfile_dir
from falcoria_worker.model import parse_task
from falcoria_worker.observers import ObserverHub, StatusLine
from falcoria_worker.systemd_notify import Notifier
from tests.support.lifecycle_walk import Life

SETTINGS = config.parse({"HOSTNAME": "scanner-1", "RABBITMQ_PASSWORD": "s3cret-pw", "CONCURRENCY": "2"})
NODE = "worker1@scanner-1"
TASK = parse_task(
    {
        "ip": "127.0.0.1",
        "hostnames": ["localhost"],
        "project": str(uuid.UUID(int=1)),
        "open_ports_opts": "-p 1-100",
        "service_opts": "-sV",
        "timeout": 60,
        "include_services": True,
        "mode": "insert",
        "user": {"id": str(uuid.UUID(int=2)), "username": "alice"},
        "open_ports_str": "",
        "track_history": True,
    }
)


class Actions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.running = {"t-running"}

    def revoke(self, task_ids: Sequence[str], *, terminate: bool) -> list[str]:
        self.calls.append(("revoke", (tuple(task_ids), terminate)))
        return [t for t in task_ids if t in self.running]

    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))

    def drain(self) -> None:
        self.calls.append(("drain", None))

    def resume(self) -> None:
        self.calls.append(("resume", None))


def snapshot(*views: TaskView) -> Snapshot:
    return Snapshot(
        hostname=NODE,
        pid=os.getpid(),
        started_at=time.time() - 5,
        settings=SETTINGS,
        tasks=views,
        totals={"project.nmap.scan": len(views)},
        revoked=("t-old",),
        queues=(broker.scan_queue(SETTINGS),),
        broker={"hostname": "127.0.0.1", "userid": "guest", "port": 5672, "transport": "amqp"},
        task_names=("project.nmap.scan", "project.nmap.cancel", "worker.update_ip"),
    )


@pytest.fixture
def events() -> Iterator[CeleryEvents]:
    # kombu's in-memory transport: a real dispatcher, no broker.
    sender = CeleryEvents(lambda: Connection("memory://"), NODE, task_events=False)
    yield sender
    sender.close()


@pytest.fixture
def panel(events: CeleryEvents) -> tuple[ControlPanel, Actions]:
    actions = Actions()
    running = TaskView("t-running", task=TASK, stage=Stage.PORTS_SCAN, started_at=time.time(), attempt=1)
    waiting = TaskView("t-waiting", task=TASK, stage=Stage.LEASED, attempt=1)
    return ControlPanel(lambda: snapshot(running, waiting), actions, events), actions


def test_every_celery_command_is_answered(panel: tuple[ControlPanel, Actions]) -> None:
    handlers = panel[0].handlers()
    assert set(Panel.data) <= set(handlers), set(Panel.data) - set(handlers)


@pytest.mark.parametrize(
    "command",
    ["pool_grow", "pool_shrink", "pool_restart", "autoscale", "rate_limit", "time_limit", "election",
     "objgraph", "memsample", "memdump", "revoke_by_stamped_headers"],
)  # fmt: skip
def test_commands_that_do_not_apply_get_celerys_error_reply(
    panel: tuple[ControlPanel, Actions], command: str
) -> None:
    reply = panel[0].handlers()[command](None, n=1)
    assert set(reply) == {"error"} and "not supported by falcoria-worker" in reply["error"]


def test_request_dicts_have_celerys_keys(panel: tuple[ControlPanel, Actions]) -> None:
    handlers = panel[0].handlers()
    (active,) = handlers["active"](None)
    (reserved,) = handlers["reserved"](None)
    celery_keys = {"id", "name", "args", "kwargs", "type", "hostname", "time_start", "acknowledged",
                   "delivery_info", "worker_pid"}  # fmt: skip
    assert celery_keys <= set(active) and celery_keys <= set(reserved)
    assert active["id"] == "t-running" and active["hostname"] == NODE and active["acknowledged"]
    assert active["args"] == [payload(TaskView("x", task=TASK))] and active["args"][0]["ip"] == "127.0.0.1"
    assert reserved["id"] == "t-waiting" and reserved["time_start"] is None
    assert set(active["delivery_info"]) == {"exchange", "routing_key", "priority", "redelivered"}
    assert handlers["query_task"](None, ids=["t-running", "nope"]) == {"t-running": ("active", active)}


def test_stats_conf_and_report(panel: tuple[ControlPanel, Actions]) -> None:
    handlers = panel[0].handlers()
    stats = handlers["stats"](None)
    assert stats["pool"]["max-concurrency"] == 2 and stats["total"] == {"project.nmap.scan": 2}
    assert {"utime", "stime", "maxrss"} <= set(stats["rusage"]) and stats["uptime"] >= 5
    assert {"pid", "clock", "broker", "prefetch_count"} <= set(stats)
    conf = handlers["conf"](None)
    assert conf["RABBITMQ_PASSWORD"] == "***" and conf["CONCURRENCY"] == "2"
    report = handlers["report"](None)["ok"]
    assert "celery:" in report and "s3cret-pw" not in report and "s3cret-pw" not in str(conf)
    assert handlers["registered"](None) == ["project.nmap.cancel", "project.nmap.scan", "worker.update_ip"]
    (queue,) = handlers["active_queues"](None)
    assert queue["name"] == "nmap_scan_queue" and queue["exchange"]["type"] == "topic"


def test_revoke_terminate_drain_and_hello(panel: tuple[ControlPanel, Actions]) -> None:
    control, actions = panel
    handlers = control.handlers()
    assert handlers["revoke"](None, task_id="t-running") == {"ok": "tasks t-running flagged as revoked"}
    assert handlers["revoke"](None, task_id=["t-running", "../x"], terminate=True) == {
        "ok": "terminate: t-running"
    }
    assert handlers["terminate"](None, signal="TERM", task_id="t-gone") == {"ok": "terminate: tasks unknown"}
    assert handlers["cancel_consumer"](None, queue="nmap_scan_queue") == {
        "ok": "no longer consuming from nmap_scan_queue"
    }
    assert "error" in handlers["cancel_consumer"](None, queue="nmap_cancel_queue")
    assert handlers["add_consumer"](None, queue="nmap_scan_queue") == {"ok": "add consumer nmap_scan_queue"}
    handlers["shutdown"](None)
    assert [name for name, _ in actions.calls] == [
        "revoke",
        "revoke",
        "revoke",
        "drain",
        "resume",
        "shutdown",
    ]
    assert actions.calls[1][1] == (("t-running",), True)  # the invalid id never reaches the loop
    assert handlers["hello"](None, from_node=NODE) is None
    hello = handlers["hello"](None, from_node="stock@elsewhere", revoked=["a"])
    assert hello["revoked"] == ["t-old"] and isinstance(hello["clock"], int)


def test_events_switch_like_a_stock_worker(events: CeleryEvents, panel: tuple[ControlPanel, Actions]) -> None:
    handlers = panel[0].handlers()
    assert not events.task_events
    assert handlers["enable_events"](None) == {"ok": "task events enabled"}
    assert handlers["enable_events"](None) == {"ok": "task events already enabled"}
    assert events.task_events
    assert handlers["disable_events"](None) == {"ok": "task events disabled"}
    assert handlers["disable_events"](None) == {"ok": "task events already disabled"}
    assert CeleryEvents(lambda: Connection("memory://"), NODE, task_events=True).task_events


def test_event_fields() -> None:
    delivery = type("D", (), {"headers": {"argsrepr": "({'ip': '127.0.0.1'},)", "retries": 0}})()
    view = TaskView("t1", task=TASK, delivery=delivery, attempt=2, started_at=100.0, open_ports=3,
                    note="delivered", outcome=Outcome.COMPLETED)  # fmt: skip
    fields = received_fields(view, "project.nmap.scan")
    assert fields["args"] == "({'ip': '127.0.0.1'},)" and fields["retries"] == 1
    assert set(fields) == {"name", "args", "kwargs", "root_id", "parent_id", "retries", "eta", "expires"}
    assert scan_result(view) == "3 open ports; delivered"
    assert end_event(view, 104.5) == ("task-succeeded", {"result": "3 open ports; delivered", "runtime": 4.5})
    failed = TaskView("t1", outcome=Outcome.FAILED, error="rejected: ip: not an IP address")
    assert end_event(failed, 1.0) == ("task-failed", {"exception": failed.error, "traceback": ""})
    cancelled = TaskView("t1", outcome=Outcome.CANCELLED, started_at=1.0)
    assert end_event(cancelled, 2.0) == ("task-revoked", {"terminated": True, "signum": 15, "expired": False})
    assert end_event(TaskView("t1", outcome=Outcome.REQUEUED, error="re-queued: nmap killed"), 1)[0] == (
        "task-retried"
    )
    assert end_event(TaskView("t1", outcome=Outcome.TAKEN_OVER), 1.0) is None


def test_textfile_dir_setting(tmp_path: Path) -> None:
    assert textfile_dir("") is None
    assert textfile_dir(str(tmp_path)) == tmp_path
    assert textfile_dir("auto") in (None, Path("/var/lib/prometheus/node-exporter"))
    assert rejection_reason("rejected: open_ports_opts: --script is not allowed") == "open_ports_opts"
    assert rejection_reason("rejected: hostnames[3]: bad") == "hostnames"
    assert rejection_reason("nmap failed") == "other"


def read_metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_file_follows_the_tasks(tmp_path: Path) -> None:
    metrics = Metrics(tmp_path, "3", "1.2.3", spool_counts=lambda: {"pending": 1, "failed": 4})
    metrics.tick(time.monotonic() + 60)  # nothing changed, but the interval has passed: written
    (tmp_path / "falcoria-worker@3.prom").unlink()
    old = os.umask(0o077)  # the unit's UMask
    try:
        Life([metrics], "t1", TASK).scan(open_ports=3, start=1000.0)
        Life([metrics], "t2", None).refuse("open_ports_opts: --script is not allowed")
        running = Life([metrics], "t3", TASK)
        for event in (Event.RECEIVED, Event.LEASED, Event.ADMITTED):
            running.move(event)
        # The deliverer's report of an upload, and a lease found expired: transitions like the others.
        metrics.observe(step(stored_task("t1"), Event.DELIVERED, time.time()))
        metrics.observe(step(new_task("t4"), Event.LEASE_EXPIRED, time.time(), own_lease=False))
        assert not (tmp_path / "falcoria-worker@3.prom").exists()  # transitions only mark a change
        metrics.draining_changed(True)
        metrics.raw_socket_capable(True)
        metrics.tick(time.monotonic() + SETTLE)
    finally:
        os.umask(old)
    path = tmp_path / "falcoria-worker@3.prom"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    got = read_metrics(path)
    assert got[("falcoria_worker_tasks_total", (("outcome", "completed"),))] == 1
    assert got[("falcoria_worker_tasks_total", (("outcome", "failed"),))] == 1
    assert got[("falcoria_worker_rejected_tasks_total", (("reason", "open_ports_opts"),))] == 1
    assert got[("falcoria_worker_open_ports_total", ())] == 3
    assert got[("falcoria_worker_running_tasks", ())] == 1
    assert got[("falcoria_worker_phase_seconds_count", (("phase", "ports_scan"),))] == 1
    assert got[("falcoria_worker_phase_seconds_sum", (("phase", "ports_scan"),))] == pytest.approx(1.0)
    assert got[("falcoria_worker_phase_seconds_sum", (("phase", "service_scan"),))] == pytest.approx(2.0)
    assert got[("falcoria_worker_draining", ())] == 1
    assert got[("falcoria_worker_uploads_total", (("result", "delivered"),))] == 1
    assert got[("falcoria_worker_spool_reports", (("state", "pending"),))] == 1
    assert got[("falcoria_worker_lease_recoveries_total", ())] == 1
    assert got[("falcoria_worker_raw_socket_capable", ())] == 1
    assert got[("falcoria_worker_build_info", (("version", "1.2.3"),))] == 1
    metrics.remove()
    assert not path.exists()


def test_metrics_changes_are_written_once_they_settle(tmp_path: Path) -> None:
    metrics = Metrics(tmp_path, "1", "1.0")
    path = tmp_path / "falcoria-worker@1.prom"
    metrics.write()
    written = metrics.next_due()
    assert written == pytest.approx(time.monotonic() + WRITE_INTERVAL, abs=1.0)  # nothing changed
    path.unlink()
    before = time.monotonic()
    Life([metrics], "t1", TASK).scan(open_ports=2)  # a burst of transitions: one write
    metrics.consuming_changed(False)
    due = metrics.next_due()
    assert before + SETTLE <= due <= time.monotonic() + SETTLE
    metrics.tick(due - 0.01)
    assert not path.exists()  # the loop's turns in between write nothing
    metrics.tick(due)
    got = read_metrics(path)
    assert got[("falcoria_worker_open_ports_total", ())] == 2
    assert got[("falcoria_worker_consuming", ())] == 0
    assert metrics.next_due() == pytest.approx(due + WRITE_INTERVAL)


def test_hub_wakes_the_loop_for_its_earliest_observer() -> None:
    class Timer:
        def __init__(self, due: float | None) -> None:
            self.due = due

        def tick(self, now: float) -> None: ...

        def next_due(self) -> float | None:
            return self.due

    hub = ObserverHub()
    assert hub.next_due() is None
    hub.add_ticking(Timer(None))
    assert hub.next_due() is None
    hub.add_ticking(Timer(30.0))
    hub.add_ticking(Timer(20.0))
    assert hub.next_due() == 20.0


def test_worker_heartbeats_are_due_every_interval_while_online() -> None:
    sender = CeleryEvents(lambda: Connection("memory://"), NODE, task_events=False)
    assert sender.next_due() is None  # not online yet: no heartbeat wakes the loop
    sender.worker_ready()
    due = sender.next_due()
    assert due is not None and due == pytest.approx(time.monotonic() + 2.0, abs=0.5)
    sender.tick(due)
    assert sender.next_due() == pytest.approx(due + 2.0)
    sender.worker_stopping()
    assert sender.next_due() is None


def test_metrics_write_failure_never_raises(tmp_path: Path) -> None:
    metrics = Metrics(tmp_path / "missing", "1", "1.0")
    metrics.write()
    metrics.tick(time.monotonic() + 60)
    metrics.remove()


def test_events_are_dropped_while_the_broker_is_away() -> None:
    attempts: list[float] = []

    def unreachable() -> Connection:
        attempts.append(time.monotonic())
        raise ConnectionRefusedError("no broker")

    sender = CeleryEvents(unreachable, NODE, task_events=True)
    sender.worker_ready()
    Life([sender], "t1", TASK).scan(open_ports=1)
    assert len(attempts) == 1  # one try, then nothing waits on a connect until the retry time


def test_status_line_says_how_many_scans_are_left_while_draining() -> None:
    line = StatusLine(Notifier())
    hub = ObserverHub()
    hub.add(line)
    hub.add_worker(line)
    assert line.text(broker_down=None, redis_ok=True, scans=0) == "idle"
    hub.worker_event("draining_changed", True)
    assert line.text(broker_down=None, redis_ok=True, scans=0) == "draining: 0 scans left"
    Life([line], "t1", TASK).start(time.time())
    text = line.text(broker_down=None, redis_ok=True, scans=1)
    assert text == "draining: 1 scan left; scanning 127.0.0.1: open ports"
    hub.worker_event("draining_changed", False)
    assert line.text(broker_down=None, redis_ok=True, scans=1) == "scanning 127.0.0.1: open ports"


def test_status_line_keeps_saying_each_part_s_problem_while_it_lasts() -> None:
    class Part:
        problem: str | None = None

    reload, spool = Part(), Part()
    line = StatusLine(Notifier(), reload, None, spool)  # None: an instance without ScanLedger
    assert line.text(broker_down=None, redis_ok=True, scans=0) == "idle"
    spool.problem = "1 report spooled: ScanLedger unavailable"
    reload.problem = "reload refused: SCOPE_DENY"
    text = line.text(broker_down=None, redis_ok=True, scans=0)
    assert text == "idle; reload refused: SCOPE_DENY; 1 report spooled: ScanLedger unavailable"
    spool.problem = reload.problem = None
    assert line.text(broker_down=None, redis_ok=True, scans=0) == "idle"


def test_hub_ticks_its_observers_and_survives_one_that_fails(tmp_path: Path) -> None:
    class Broken:
        def tick(self, now: float) -> None:
            raise RuntimeError("broken")

    metrics = Metrics(tmp_path, "1", "1.0")
    hub = ObserverHub()
    hub.add_ticking(Broken())
    hub.add_ticking(metrics)
    hub.tick(time.monotonic() + 60)
    assert (tmp_path / "falcoria-worker@1.prom").exists()
