"""Celery's own tools against a running `falcoria-worker run`, on the real test broker, with real scans
driven by the test Tasker: Flower lists the instance and its scans by state from our events and counts
them on its /metrics, `celery inspect` gets replies with every key a stock worker's have, node_exporter
serves our textfile, and a drained instance finishes its scan, takes no new one and resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection, pools

from falcoria_worker import config
from falcoria_worker.drain import drain
from tests.support.celerycli import inspect, keys_missing, stock_worker
from tests.support.drive import (
    held_phase2,
    scan_fields,
    slow_phase1,
    status,
    wait_phase,
    wait_until,
)
from tests.support.monitoring import Flower, NodeExporter, running, screenshot
from tests.support.services import RabbitMQ
from tests.support.tasker import Tasker
from tests.support.workerproc import WorkerProcess

pytestmark = pytest.mark.integration

HOST = "scanner-1"
NODE = f"worker1@{HOST}"
TASK_NAMES = ("project.nmap.scan", "project.nmap.cancel", "worker.update_ip")
REPO = Path(__file__).resolve().parents[2]
HOSTILE = "-p 80 --script http-title"  # refused: scripts are never run


def settings_for(broker: RabbitMQ) -> config.Settings:
    return config.parse(
        {
            "HOSTNAME": HOST,
            "RABBITMQ_HOST": broker.host,
            "RABBITMQ_PORT": str(broker.port),
            "RABBITMQ_USER": broker.user,
            "RABBITMQ_PASSWORD": broker.password,
            "RABBITMQ_VHOST": broker.vhost,
        }
    )


@pytest.fixture(autouse=True)
def fresh_connection_pools() -> Iterator[None]:
    # Celery's control client takes connections from kombu's process-wide pools, keyed by URL: one kept
    # from an earlier test was closed by clean_broker's vhost reset.
    pools.reset()
    yield
    pools.reset()


@pytest.fixture
def tasker(clean_broker, redis_server) -> Iterator[Tasker]:
    redis_server.flush()
    t = Tasker(clean_broker, redis_server.client())
    yield t
    t.close()


@pytest.fixture
def node(worker_factory, scanledger, redis_server, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """A real instance named NODE, writing its metrics to tmp_path/textfile. Every test's NODE is the same
    node: Redis starts empty (no claim of an earlier test's instance) and the instance stops cleanly."""
    redis_server.flush()
    textfiles = tmp_path / "textfile"
    textfiles.mkdir(exist_ok=True)
    made: list[WorkerProcess] = []

    def make(**extra: str) -> WorkerProcess:
        worker = worker_factory(
            ledger=scanledger, hostname=HOST, METRICS_TEXTFILE_DIR=str(textfiles), **extra
        )
        made.append(worker)
        return worker.start()

    yield make
    for worker in made:
        if worker.alive():
            worker.stop()


def control(broker: RabbitMQ, command: str, **arguments: object) -> object:
    app = Celery("tasker", broker=broker.url(), set_as_current=False)
    try:
        (reply,) = app.control.broadcast(command, arguments=arguments, destination=[NODE], reply=True,
                                         timeout=5)  # fmt: skip
    finally:
        app.close()
    return reply[NODE]


def test_flower_and_node_exporter_show_real_scans_by_state(
    clean_broker: RabbitMQ, tasker, node, scanledger, netns_lab, redis_server, tmp_path: Path
) -> None:
    with running(Flower.start(clean_broker, tmp_path / "flower.log")) as flower:
        worker = node(CONCURRENCY="2")
        flower.wait_for("/api/workers?refresh=1", lambda got: NODE in got)
        # Task events are off by default; enable_events switches them on, as Flower does every 5 s.
        assert control(clean_broker, "enable_events") in (
            {"ok": "task events enabled"},
            {"ok": "task events already enabled"},
        )
        ok = tasker.send_scan(**scan_fields(netns_lab.services, "21,22,80"), project=scanledger.project)
        refused = tasker.send_scan(**scan_fields(netns_lab.services, "80", open_ports_opts=HOSTILE))
        cancelled = tasker.send_scan(**slow_phase1(netns_lab.blackhole))
        wait_phase(redis_server, cancelled, "ports_scan", worker)
        tasker.cancel([cancelled])
        wanted = (ok, refused, cancelled)

        def all_ended(got: dict) -> bool:
            return all(got.get(t, {}).get("state") in ("SUCCESS", "FAILURE", "REVOKED") for t in wanted)

        tasks = flower.wait_for("/api/tasks", all_ended, timeout=120)
        assert tasks[ok]["state"] == "SUCCESS" and tasks[ok]["name"] == "project.nmap.scan"
        assert tasks[ok]["result"].startswith("3 open ports") and tasks[ok]["worker"] == NODE
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

    textfile = tmp_path / "textfile" / "falcoria-worker@1.prom"
    # The upload follows the scan's end; the loop's next turn writes the file.
    wait_until(lambda: 'uploads_total{result="delivered"} 1.0' in textfile.read_text(), what="the upload")
    with running(NodeExporter.start(tmp_path / "textfile", tmp_path / "node_exporter.log")) as exporter:
        text = exporter.metrics()
    assert 'falcoria_worker_tasks_total{outcome="completed"} 1' in text
    assert 'falcoria_worker_tasks_total{outcome="cancelled"} 1' in text
    assert 'falcoria_worker_rejected_tasks_total{reason="option"} 1' in text
    assert "falcoria_worker_open_ports_total 3" in text
    assert 'falcoria_worker_uploads_total{result="delivered"} 1' in text
    assert "falcoria_worker_raw_socket_capable 1" in text
    assert "node_textfile_scrape_error 0" in text
    assert worker.stop() == 0 and not textfile.exists()  # a clean stop removes the file


INSPECT = ("ping", "stats", "active", "reserved", "scheduled", "registered", "revoked", "active_queues",
           "conf", "report", "clock")  # fmt: skip


def test_inspect_replies_have_every_key_of_a_stock_workers(
    clean_broker: RabbitMQ, tasker, node, netns_lab, redis_server, tmp_path: Path
) -> None:
    worker = node()
    scan_id = tasker.send_scan(**slow_phase1(netns_lab.blackhole), timeout=600)  # outlasts the inspects
    wait_phase(redis_server, scan_id, "ports_scan", worker)  # busy: the stock worker gets the next scan
    stock = f"stock@{HOST}"
    app = Celery("tasker", broker=clean_broker.url(), set_as_current=False)
    with stock_worker(clean_broker, stock, tmp_path / "stock.log"):
        # A starting stock worker asks every node for its revoked ids: ours answered its hello.
        assert "mingle: sync with 1 nodes" in (tmp_path / "stock.log").read_text()
        stock_scan = app.send_task(
            "project.nmap.scan",
            args=[{"ip": "127.0.0.1", "timeout": 600}],  # the stock app sleeps that long
            exchange="nmap_exchange",
            routing_key="nmap.scan",
        )
        replies = {}
        app.close()
        for command in (*INSPECT, "query_task"):
            ids = [stock_scan.id, scan_id] if command == "query_task" else []
            got: dict = {}
            for _ in range(20):  # until the stock worker has started its scan
                got = inspect(clean_broker, command, f"{stock},{NODE}", *ids)
                if command not in ("active", "query_task") or (got.get(stock) and got.get(NODE)):
                    break
                time.sleep(1)
            assert set(got) == {stock, NODE}, (command, got, (tmp_path / "stock.log").read_text()[-3000:])
            replies[command] = got
    tasker.cancel([scan_id])

    (tmp_path / "inspect.json").write_text(json.dumps(replies, indent=1, default=str))
    for command, got in replies.items():
        theirs, ours = got[stock], got[NODE]
        if command in ("conf", "report"):
            assert type(theirs) is type(ours) and set(ours) >= ({"ok"} if command == "report" else set())
            continue
        if command == "query_task":  # {task id: [state, request]}: the ids differ, the requests compare
            (theirs,), (ours,) = theirs.values(), ours.values()
            assert theirs[0] == ours[0] == "active"
        assert keys_missing(theirs, ours) == [], command
    assert set(replies["stats"][stock]["pool"]) <= set(replies["stats"][NODE]["pool"])
    assert set(replies["stats"][stock]["broker"]) <= set(replies["stats"][NODE]["broker"])
    assert set(replies["active"][stock][0]) <= set(replies["active"][NODE][0])
    assert replies["active"][NODE][0]["id"] == scan_id
    assert replies["active"][NODE][0]["args"][0]["ip"] == netns_lab.blackhole.ip
    assert set(replies["query_task"][NODE]) == {scan_id}
    assert replies["stats"][NODE]["total"] == {"project.nmap.scan": 1}
    assert replies["conf"][NODE]["RABBITMQ_PASSWORD"] == "***"
    assert clean_broker.password not in json.dumps([replies[command][NODE] for command in ("conf", "report")])


def test_control_commands(clean_broker: RabbitMQ, node) -> None:
    worker = node()
    assert control(clean_broker, "enable_events") == {"ok": "task events enabled"}
    assert control(clean_broker, "disable_events") == {"ok": "task events disabled"}
    assert control(clean_broker, "cancel_consumer", queue="nmap_scan_queue") == {
        "ok": "no longer consuming from nmap_scan_queue"
    }
    names = [q["name"] for q in inspect(clean_broker, "active_queues", NODE)[NODE]]
    assert "nmap_scan_queue" not in names
    assert inspect(clean_broker, "stats", NODE)[NODE]["draining"] is True
    assert control(clean_broker, "add_consumer", queue="nmap_scan_queue") == {
        "ok": "add consumer nmap_scan_queue"
    }
    assert control(clean_broker, "revoke", task_id=str(uuid.uuid4()), terminate=True) == {
        "ok": "terminate: tasks unknown"
    }
    for command in ("pool_grow", "autoscale", "rate_limit", "time_limit", "memdump"):
        assert "error" in control(clean_broker, command), command
    assert control(clean_broker, "shutdown") == {
        "ok": "shutting down: running scans are stopped and handed back to the queue"
    }
    assert worker.proc is not None and worker.proc.wait(30) == 0
    assert "shutdown by remote control" in worker.log()


def queued(broker: RabbitMQ) -> int:
    with Connection(broker.url()) as conn:
        return conn.default_channel.queue_declare("nmap_scan_queue", passive=True).message_count


def drain_cli(worker: WorkerProcess, *words: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "falcoria_worker", "drain", "--instance", worker.instance, *words]
    return subprocess.run(argv, env=worker.env, capture_output=True, text=True, timeout=300, check=False)


def test_drained_instance_finishes_its_scan_takes_no_new_one_and_resumes(
    clean_broker: RabbitMQ, tasker, node, netns_lab, held_service, redis_server
) -> None:
    worker = node()
    # Phase 2 is held until the test releases it: the drain always finds the scan running.
    first = tasker.send_scan(**held_phase2(held_service))
    wait_phase(redis_server, first, "service_scan", worker)
    done = drain_cli(worker)
    assert done.returncode == 0, done.stdout + done.stderr
    worker.notify.wait_for(lambda line: line.startswith("STATUS=draining: 1 scan left"))
    second = tasker.send_scan(**scan_fields(netns_lab.services, "80"))
    held_service.release()
    done = drain_cli(worker, "--wait")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"{NODE}: drained, no scan left"
    assert status(redis_server, first).get("state") == "completed"
    assert queued(clean_broker) == 1 and status(redis_server, second).get("state") in (None, "queued")
    done = drain_cli(worker, "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    wait_until(lambda: status(redis_server, second).get("state") == "completed", timeout=60, what="resumed")


def test_drain_of_an_instance_that_is_not_running(clean_broker: RabbitMQ) -> None:
    said: list[str] = []
    settings = settings_for(clean_broker)
    assert drain(settings, say=said.append) == 1
    assert said == [f"{NODE} did not drain: no reply"]
