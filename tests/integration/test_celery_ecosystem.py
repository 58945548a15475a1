"""Celery's own tools against falcoria-worker's observers and control panel, on the real test broker.

Until the run loop is wired to them, `OurNode` stands in for its two duties here: it serves the
ControlPanel on the Celery pidbox (broker.listen_control, as the loop does) and calls the events'
tick(); the task transitions come from the lifecycle stand-in. What these tests prove is wire
compatibility: Flower lists our scans with the right states from our events, `celery inspect` gets
replies with every key a stock worker's have, and node_exporter serves our textfile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, pools

from falcoria_worker import broker as amqp_side
from falcoria_worker import config
from falcoria_worker.celery_control import ControlPanel, Snapshot, payload
from falcoria_worker.celery_events import CeleryEvents
from falcoria_worker.drain import drain, resume
from falcoria_worker.metrics import Metrics
from falcoria_worker.model import parse_task
from tests.support.celerycli import inspect, keys_missing, stock_worker
from tests.support.lifecycle_standin import Life, Stage, TaskView
from tests.support.monitoring import Flower, NodeExporter, running, screenshot
from tests.support.services import RabbitMQ

pytestmark = pytest.mark.integration

HOST = "scanner-1"
NODE = f"worker1@{HOST}"
STOCK = f"stock@{HOST}"
TASK_NAMES = ("project.nmap.scan", "project.nmap.cancel", "worker.update_ip")
REPO = Path(__file__).resolve().parents[2]


def task(ip: str = "127.0.0.1") -> object:
    return parse_task(
        {
            "ip": ip,
            "hostnames": [],
            "project": str(uuid.uuid4()),
            "open_ports_opts": "-p 1-1024",
            "service_opts": "-sV",
            "timeout": 600,
            "include_services": True,
            "mode": "insert",
            "user": {"id": str(uuid.uuid4()), "username": "operator"},
            "open_ports_str": "",
            "track_history": True,
        }
    )


def settings_for(broker: RabbitMQ) -> config.Settings:
    return config.parse(
        {
            "HOSTNAME": HOST,
            "RABBITMQ_HOST": broker.host,
            "RABBITMQ_PORT": str(broker.port),
            "RABBITMQ_USER": broker.user,
            "RABBITMQ_PASSWORD": broker.password,
            "RABBITMQ_VHOST": broker.vhost,
            "CONCURRENCY": "2",
        }
    )


class OurNode:
    """The pidbox and the events of one instance, served from a thread as the run loop will."""

    def __init__(self, broker: RabbitMQ, *, task_events: bool) -> None:
        self.settings = settings_for(broker)
        self.started = time.time()
        self.tasks: list[TaskView] = []
        self.revoked: list[str] = []
        self.draining = False
        self.calls: list[str] = []
        self.events = CeleryEvents(lambda: amqp_side.connect(self.settings), NODE, task_events=task_events)
        self.panel = ControlPanel(self.snapshot, self, self.events)
        self.conn: Connection = amqp_side.connect(self.settings)
        channel = self.conn.channel()
        self.queues = (
            amqp_side.scan_queue(self.settings),
            amqp_side.broadcast_queue(self.settings.nmap_cancel_queue_name),
            amqp_side.broadcast_queue(self.settings.worker_service_broadcast_queue),
        )
        for queue in self.queues:
            queue(channel).declare()
        amqp_side.listen_control(self.conn, channel, NODE, self.panel.handlers())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.events.worker_ready()

    def snapshot(self) -> Snapshot:
        return Snapshot(
            hostname=NODE,
            pid=os.getpid(),
            started_at=self.started,
            settings=self.settings,
            tasks=tuple(self.tasks),
            totals={"project.nmap.scan": len(self.tasks)},
            revoked=tuple(self.revoked),
            queues=self.queues[1:] if self.draining else self.queues,
            broker=self.conn.info(),
            task_names=TASK_NAMES,
            draining=self.draining,
            scans_left=len(self.tasks),
        )

    # WorkerActions
    def revoke(self, task_ids: Sequence[str], *, terminate: bool) -> list[str]:
        self.revoked += task_ids
        return [v.task_id for v in self.tasks if v.task_id in task_ids]

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def drain(self) -> None:
        self.draining = True

    def resume(self) -> None:
        self.draining = False

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.events.tick()
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.events.worker_stopping()
        self.conn.release()


@pytest.fixture(autouse=True)
def fresh_connection_pools() -> Iterator[None]:
    # Celery's control client takes connections from kombu's process-wide pools, keyed by URL: one kept
    # from an earlier test was closed by clean_broker's vhost reset.
    pools.reset()
    yield
    pools.reset()


@pytest.fixture
def our_node(clean_broker: RabbitMQ) -> Iterator[OurNode]:
    node = OurNode(clean_broker, task_events=False)
    yield node
    node.close()


def test_flower_lists_our_instance_and_scans_by_state(
    clean_broker: RabbitMQ, our_node: OurNode, tmp_path: Path
) -> None:
    with running(Flower.start(clean_broker, tmp_path / "flower.log")) as flower:
        # Task events are off by default; Flower's enable_events switches them on, as on a stock worker.
        flower.wait_for("/api/workers?refresh=1", lambda got: NODE in got)
        deadline = time.monotonic() + 30
        while not our_node.events.task_events and time.monotonic() < deadline:
            time.sleep(0.2)
        our_node.events.enable_task_events()  # Flower resends it every 5 s; no need to wait for that
        ok, refused, cancelled = (str(uuid.uuid4()) for _ in range(3))
        Life([our_node.events], ok, task()).scan(open_ports=3)
        Life([our_node.events], refused, task()).refuse("open_ports_opts: --script is not allowed")
        Life([our_node.events], cancelled, task()).cancel_running()

        wanted = (ok, refused, cancelled)

        def all_ended(got: dict) -> bool:
            return all(got.get(t, {}).get("state") in ("SUCCESS", "FAILURE", "REVOKED") for t in wanted)

        tasks = flower.wait_for("/api/tasks", all_ended)
        assert tasks[ok]["state"] == "SUCCESS" and tasks[ok]["name"] == "project.nmap.scan"
        assert tasks[ok]["result"] == "3 open ports; delivered" and tasks[ok]["worker"] == NODE
        assert tasks[refused]["state"] == "FAILURE" and "--script" in tasks[refused]["exception"]
        assert tasks[cancelled]["state"] == "REVOKED"

        workers = flower.get("/api/workers?refresh=1")
        assert workers[NODE]["stats"]["pool"]["max-concurrency"] == 2
        assert workers[NODE]["registered"] == sorted(TASK_NAMES)
        assert workers[NODE]["active_queues"][0]["name"] == "nmap_scan_queue"

        metrics = flower.get("/metrics")
        for kind in ("task-received", "task-started", "task-succeeded", "task-failed", "task-revoked"):
            assert f'flower_events_total{{task="project.nmap.scan",type="{kind}",worker="{NODE}"}}' in metrics

        png = tmp_path / "flower-tasks.png"
        screenshot(f"{flower.url}/tasks", png, tmp_path / "chromium")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        if os.environ.get("FW_UPDATE_SCREENSHOTS"):  # the README's picture
            shutil.copy(png, REPO / "docs" / "flower-tasks.png")


INSPECT = ("ping", "stats", "active", "reserved", "scheduled", "registered", "revoked", "active_queues",
           "conf", "report", "clock")  # fmt: skip


def test_inspect_replies_have_every_key_of_a_stock_workers(
    clean_broker: RabbitMQ, our_node: OurNode, tmp_path: Path
) -> None:
    app = Celery("tasker", broker=clean_broker.url(), set_as_current=False)
    scan_id = str(uuid.uuid4())
    view = TaskView(scan_id, task=task(), stage=Stage.PORTS_SCAN, started_at=time.time(), attempt=1)
    our_node.tasks.append(view)
    with stock_worker(clean_broker, STOCK, tmp_path / "stock.log"):
        # A starting stock worker asks every node for its revoked ids: ours answered its hello.
        assert "mingle: sync with 1 nodes" in (tmp_path / "stock.log").read_text()
        stock_scan = app.send_task(
            "project.nmap.scan", args=[payload(view)], exchange="nmap_exchange", routing_key="nmap.scan"
        )
        replies = {}
        app.close()
        for command in (*INSPECT, "query_task"):
            ids = [stock_scan.id, scan_id] if command == "query_task" else []
            got: dict = {}
            for _ in range(20):  # until the stock worker has started its scan
                got = inspect(clean_broker, command, f"{STOCK},{NODE}", *ids)
                if command not in ("active", "query_task") or (got.get(STOCK) and got.get(NODE)):
                    break
                time.sleep(1)
            assert set(got) == {STOCK, NODE}, (command, got, (tmp_path / "stock.log").read_text()[-3000:])
            replies[command] = got

    (tmp_path / "inspect.json").write_text(json.dumps(replies, indent=1, default=str))
    for command, got in replies.items():
        theirs, ours = got[STOCK], got[NODE]
        if command in ("conf", "report"):
            assert type(theirs) is type(ours) and set(ours) >= ({"ok"} if command == "report" else set())
            continue
        if command == "query_task":  # {task id: [state, request]}: the ids differ, the requests compare
            (theirs,), (ours,) = theirs.values(), ours.values()
            assert theirs[0] == ours[0] == "active"
        assert keys_missing(theirs, ours) == [], command
    assert set(replies["stats"][STOCK]["pool"]) <= set(replies["stats"][NODE]["pool"])
    assert set(replies["stats"][STOCK]["broker"]) <= set(replies["stats"][NODE]["broker"])
    theirs_request = replies["active"][STOCK][0]
    assert set(theirs_request) <= set(replies["active"][NODE][0])
    assert set(replies["query_task"][NODE]) == {scan_id}
    assert replies["conf"][NODE]["RABBITMQ_PASSWORD"] == "***"
    assert clean_broker.password not in json.dumps([replies[command][NODE] for command in ("conf", "report")])


def test_control_commands(clean_broker: RabbitMQ, our_node: OurNode) -> None:
    app = Celery("tasker", broker=clean_broker.url(), set_as_current=False)

    def ask(command: str, **arguments: object) -> object:
        (reply,) = app.control.broadcast(command, arguments=arguments, destination=[NODE], reply=True,
                                         timeout=5)  # fmt: skip
        return reply[NODE]

    assert ask("enable_events") == {"ok": "task events enabled"}
    assert ask("disable_events") == {"ok": "task events disabled"}
    assert ask("cancel_consumer", queue="nmap_scan_queue") == {
        "ok": "no longer consuming from nmap_scan_queue"
    }
    names = [q["name"] for q in inspect(clean_broker, "active_queues", NODE)[NODE]]
    assert "nmap_scan_queue" not in names and our_node.snapshot().draining
    assert ask("add_consumer", queue="nmap_scan_queue") == {"ok": "add consumer nmap_scan_queue"}
    assert ask("revoke", task_id="t-1", terminate=True) == {"ok": "terminate: tasks unknown"}
    assert our_node.revoked == ["t-1"]
    for command in ("pool_grow", "autoscale", "rate_limit", "time_limit", "memdump"):
        assert "error" in ask(command), command
    assert ask("shutdown") == {"ok": "shutting down: running scans are stopped and handed back to the queue"}
    assert our_node.calls == ["shutdown"]
    app.close()


def test_node_exporter_serves_the_textfile(tmp_path: Path) -> None:
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    metrics = Metrics(textfiles, "1", "9.9.9")
    Life([metrics], "t1", task()).scan(open_ports=4)
    Life([metrics], "t2", None).refuse("ip: not an IP address")
    metrics.tick()  # the loop's next turn writes what the transitions changed
    with running(NodeExporter.start(textfiles, tmp_path / "node_exporter.log")) as exporter:
        text = exporter.metrics()
    assert 'falcoria_worker_tasks_total{outcome="completed"} 1' in text
    assert 'falcoria_worker_rejected_tasks_total{reason="ip"} 1' in text
    assert "falcoria_worker_open_ports_total 4" in text
    assert 'falcoria_worker_build_info{version="9.9.9"} 1' in text
    assert "node_textfile_scrape_error 0" in text


def test_drain_waits_for_the_last_scan_and_resume_takes_scans_again(our_node: OurNode) -> None:
    our_node.tasks.append(TaskView("t-long", task=task(), stage=Stage.PORTS_SCAN, started_at=time.time()))
    said: list[str] = []
    assert drain(our_node.settings, wait=True, timeout=1, say=said.append, poll=0.2) == 3
    assert our_node.draining and f"{NODE}: draining: 1 scan left" in said
    finishing = threading.Timer(2, our_node.tasks.clear)
    finishing.start()
    assert drain(our_node.settings, wait=True, timeout=120, say=said.append, poll=0.2) == 0
    finishing.join()
    assert said[-1] == f"{NODE}: drained, no scan left"
    assert resume(our_node.settings, say=said.append) == 0 and not our_node.draining
    assert said[-1] == f"{NODE}: add consumer nmap_scan_queue"


def test_drain_of_an_instance_that_is_not_running(clean_broker: RabbitMQ) -> None:
    said: list[str] = []
    settings = settings_for(clean_broker)
    assert drain(settings, say=said.append) == 1
    assert said == [f"{NODE} did not drain: no reply"]


def test_drain_command_line(our_node: OurNode, clean_broker: RabbitMQ) -> None:
    env = dict(
        os.environ,
        HOSTNAME=HOST,
        RABBITMQ_HOST=clean_broker.host,
        RABBITMQ_PORT=str(clean_broker.port),
        RABBITMQ_USER=clean_broker.user,
        RABBITMQ_PASSWORD=clean_broker.password,
        RABBITMQ_VHOST=clean_broker.vhost,
    )
    argv = [sys.executable, "-m", "falcoria_worker", "drain", "--instance", "1", "--wait", "--timeout", "60"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"{NODE}: drained, no scan left" and our_node.draining
    resume = [*argv[:6], "--resume"]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and not our_node.draining, done.stderr
