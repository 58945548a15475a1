"""`falcoria-worker run` driven over the wire by the independent test Tasker (raw AMQP + Redis)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from tests.support.drive import (
    EXTENSION_KEYS,
    assert_clean_for_tasker,
    scan_fields,
    slow_phase1,
    slow_phase2,
    status,
    wait_phase,
    wait_until,
)
from tests.support.tasker import Tasker

pytestmark = pytest.mark.integration


@pytest.fixture
def tasker(clean_broker, redis_server) -> Iterator[Tasker]:
    redis_server.flush()
    t = Tasker(clean_broker, redis_server.client())
    yield t
    t.close()


def test_task_is_scanned_uploaded_and_tasker_keys_cleaned(
    tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    task_id = tasker.send_scan(
        **scan_fields(netns_lab.services, "21,22,80,81"),
        project=uuid.UUID(scanledger.project),
        mode="append",
        hostnames=["svc.example.test"],
    )
    scanledger.wait_for(lambda f: len(f.uploads) == 1, timeout=60)
    upload = scanledger.uploads[0]
    assert upload.project == scanledger.project
    assert upload.mode == "append"
    assert upload.track_history is True
    assert upload.ips == [netns_lab.services.ip]
    xml = upload.xml.decode()
    for port in (21, 22, 80):
        assert f'portid="{port}"' in xml
    assert 'name="svc.example.test"' in xml
    assert "-p 21-22,80-81 " in xml  # phase 1's truthful args: ScanLedger's replace mode reads its -p

    wait_until(lambda: status(redis_server, task_id).get("delivery") == "delivered", what="delivery status")
    st = status(redis_server, task_id)
    assert st["state"] == "completed"
    # Tasker's view: nothing active, nothing running, only our documented extension keys left
    assert tasker.status(scanledger.project) == {"active_or_queued": 0, "running": 0, "running_targets": []}
    assert tasker.leftover_keys(ignore=("worker:*", *EXTENSION_KEYS)) == []
    assert worker.alive()


def test_worker_answers_celery_ping_with_its_node_name(tasker, worker_factory) -> None:
    worker = worker_factory().start()
    replies = tasker.ping(timeout=2.0)
    assert worker.nodename in replies
    assert replies[worker.nodename] == {"ok": "pong"}


def test_update_ip_broadcast_registers_the_configured_ip(tasker, worker_factory, redis_server) -> None:
    worker = worker_factory(WORKER_IP="198.51.100.7").start()
    r = redis_server.client()
    wait_until(
        lambda: r.hget(f"worker:{worker.hostname}", "ip") == "198.51.100.7", what="registration at start"
    )
    r.delete(f"worker:{worker.hostname}")
    tasker.update_ip()
    wait_until(
        lambda: r.hget(f"worker:{worker.hostname}", "ip") == "198.51.100.7", what="registration on broadcast"
    )
    assert int(r.hget(f"worker:{worker.hostname}", "last_updated")) > 0


def test_hostile_task_is_rejected_with_a_reason_and_nmap_never_starts(
    tasker, worker_factory, netns_lab, redis_server
) -> None:
    worker = worker_factory().start()
    task_id = tasker.send_scan(
        **scan_fields(netns_lab.services, "80", service_opts="-sV --script http-title -Pn"),
    )
    wait_until(lambda: status(redis_server, task_id).get("state") == "failed", what="failed status")
    assert "--script" in status(redis_server, task_id)["error"]
    assert worker.nmap_pids() == []
    wait_until(lambda: tasker.leftover_keys(ignore=("worker:*", *EXTENSION_KEYS)) == [], what="cleanup")
    assert "--script" in worker.log()
    assert worker.alive()
    # and it keeps working
    good = tasker.send_scan(**scan_fields(netns_lab.services, "80"))
    wait_until(lambda: status(redis_server, good).get("state") == "completed", what="next task")


def test_status_and_notify_follow_the_phases(tasker, worker_factory, netns_lab, redis_server) -> None:
    worker = worker_factory().start()
    task_id = tasker.send_scan(**scan_fields(netns_lab.services, "21,22,80"))
    wait_until(
        lambda: status(redis_server, task_id).get("state") == "completed", timeout=60, what="completion"
    )
    statuses = worker.notify.statuses()
    assert "idle" in statuses
    assert any(s.startswith(f"scanning {netns_lab.services.ip}: open ports") for s in statuses)
    assert any(s.startswith(f"service scan of 3 ports on {netns_lab.services.ip}") for s in statuses)


@pytest.mark.parametrize("phase", ["ports_scan", "service_scan"])
def test_cancel_broadcast_kills_the_running_phase(
    phase, tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    fields = slow_phase1(netns_lab.blackhole) if phase == "ports_scan" else slow_phase2(netns_lab.services)
    project = uuid.uuid4()
    task_id = tasker.send_scan(**fields, project=project)
    wait_phase(redis_server, task_id, phase, worker)
    tasker.cancel([task_id])
    wait_until(lambda: worker.nmap_pids() == [], timeout=5, what="nmap group gone")
    wait_until(lambda: status(redis_server, task_id).get("state") == "cancelled", what="cancelled status")
    assert_clean_for_tasker(tasker, str(project))
    assert scanledger.uploads == []  # cancelled tasks upload nothing
    assert worker.alive()


def test_revoked_queued_task_never_starts(tasker, worker_factory, netns_lab, redis_server) -> None:
    worker = worker_factory().start()
    busy = tasker.send_scan(**slow_phase1(netns_lab.blackhole))
    wait_phase(redis_server, busy, "ports_scan", worker)
    queued = tasker.send_scan(**scan_fields(netns_lab.services, "80"))
    tasker.revoke(queued)  # Celery pidbox revoke, terminate=False, as Tasker's stop does
    time.sleep(0.5)
    tasker.cancel([busy])
    wait_until(lambda: status(redis_server, queued).get("state") == "cancelled", what="revoked task skipped")
    assert "revoked" in status(redis_server, queued)["error"]
    assert "ports_scan" not in redis_server.client().hvals(f"task:{queued}:status")


def test_stop_project_stops_running_and_queued(tasker, worker_factory, netns_lab, redis_server) -> None:
    worker = worker_factory().start()
    project = uuid.uuid4()
    running = tasker.send_scan(**slow_phase1(netns_lab.blackhole), project=project)
    wait_phase(redis_server, running, "ports_scan", worker)
    queued = tasker.send_scan(**scan_fields(netns_lab.services, "80"), project=project)
    tasker.stop_project(project)  # Tasker's GET /tasks/{project}/stop-nmap
    wait_until(lambda: worker.nmap_pids() == [], timeout=5, what="nmap stopped")
    for task_id in (running, queued):
        wait_until(lambda t=task_id: status(redis_server, t).get("state") == "cancelled", what=f"{task_id}")
    assert_clean_for_tasker(tasker, str(project))


def test_sigkill_mid_scan_restarted_instance_delivers_exactly_once(
    tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    project = uuid.UUID(scanledger.project)
    task_id = tasker.send_scan(**slow_phase2(netns_lab.services), project=project, mode="append")
    wait_phase(redis_server, task_id, "service_scan", worker)
    orphans = worker.nmap_pids()
    worker.kill()
    assert worker.nmap_pids() == orphans  # nmap outlives its killed parent ...
    worker.start()
    wait_until(
        lambda: not set(orphans) & set(worker.nmap_pids()), timeout=10, what="orphan stopped"
    )  # ... not long
    scanledger.wait_for(lambda f: len(f.uploads) >= 1, timeout=120)
    wait_until(lambda: status(redis_server, task_id).get("delivery") == "delivered", what="delivered")
    time.sleep(1)
    assert len(scanledger.uploads) == 1
    assert status(redis_server, task_id)["state"] == "completed"
    assert_clean_for_tasker(tasker, str(project))


def test_sigkill_mid_scan_other_instance_takes_over_after_the_lease(
    tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    first = worker_factory("1", ledger=scanledger).start()
    second = worker_factory("2", ledger=scanledger)
    project = uuid.UUID(scanledger.project)
    task_id = tasker.send_scan(**slow_phase2(netns_lab.services), project=project, mode="append")
    wait_phase(redis_server, task_id, "service_scan", first)
    first.kill()
    for pid in first.nmap_pids():  # as systemd would when the unit's main process dies
        import os
        import signal as sig

        os.killpg(pid, sig.SIGKILL)
    second.start()
    scanledger.wait_for(lambda f: len(f.uploads) >= 1, timeout=120)
    wait_until(lambda: status(redis_server, task_id).get("delivery") == "delivered", what="delivered")
    assert status(redis_server, task_id)["worker"] == second.nodename
    time.sleep(1)
    assert len(scanledger.uploads) == 1


def test_task_that_keeps_killing_workers_is_failed_after_max_attempts(
    tasker, worker_factory, netns_lab, redis_server
) -> None:
    worker = worker_factory(MAX_ATTEMPTS="2")
    project = uuid.uuid4()
    task_id = tasker.send_scan(**slow_phase1(netns_lab.blackhole), project=project)
    for _attempt in range(2):
        worker.start()
        wait_phase(redis_server, task_id, "ports_scan", worker)
        worker.kill()
        worker.cleanup_nmap()
    worker.start()
    wait_until(lambda: status(redis_server, task_id).get("state") == "failed", what="poison recorded")
    assert "after 2 attempts" in status(redis_server, task_id)["error"]
    assert_clean_for_tasker(tasker, str(project))


def test_scan_longer_than_consumer_timeout_completes_once(
    tasker, worker_factory, scanledger, netns_lab, redis_server, rabbitmq
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    project = uuid.UUID(scanledger.project)
    # 1000 probes 25 ms apart: about 25 s, longer than the test broker's 15 s consumer_timeout.
    fields = scan_fields(netns_lab.services, "1-1000", open_ports_opts="-n -Pn --scan-delay 25ms -p 1-1000")
    task_id = tasker.send_scan(**fields, project=project, include_services=False)
    scanledger.wait_for(lambda f: len(f.uploads) == 1, timeout=120)
    wait_until(lambda: status(redis_server, task_id).get("state") == "completed", what="completed")
    started = float(status(redis_server, task_id)["updated_at"])
    assert "PRECONDITION_FAILED" not in worker.log()
    assert "connection problem" not in worker.log()
    time.sleep(2)
    assert len(scanledger.uploads) == 1
    assert worker.alive()
    assert started > 0


def test_sigterm_hands_the_task_back_and_leaves_nothing_running(
    tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    # Both are up before the scan starts (an instance's start can outlast the slow phase on a busy
    # machine); the one that runs it is stopped.
    pair = [worker_factory(n, ledger=scanledger).start() for n in ("1", "2")]
    project = uuid.UUID(scanledger.project)
    task_id = tasker.send_scan(**slow_phase2(netns_lab.services), project=project, mode="append")
    wait_until(lambda: status(redis_server, task_id).get("state") == "service_scan", what="service_scan")
    worker, other = pair if status(redis_server, task_id)["worker"] == pair[0].nodename else pair[::-1]
    wait_phase(redis_server, task_id, "service_scan", worker)
    # The other instance is idle: it receives the handed-back copy at once, so the lease must be released
    # before the copy is published, or that instance drops it as a duplicate and the task is lost.
    assert worker.stop(timeout=20) == 0
    assert "STOPPING=1" in worker.notify.lines()
    scanledger.wait_for(lambda f: len(f.uploads) == 1, timeout=120)
    wait_until(lambda: status(redis_server, task_id).get("state") == "completed", what="completed")
    assert status(redis_server, task_id)["worker"] == other.nodename
    assert "stopped by shutdown; handing the task back" in worker.log()
    time.sleep(1)
    assert len(scanledger.uploads) == 1


def test_sigterm_with_no_other_instance_queues_the_task_for_the_next_start(
    tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    worker = worker_factory(ledger=scanledger).start()
    project = uuid.UUID(scanledger.project)
    task_id = tasker.send_scan(**slow_phase2(netns_lab.services), project=project, mode="append")
    wait_phase(redis_server, task_id, "service_scan", worker)
    assert worker.stop(timeout=20) == 0
    assert worker.nmap_pids() == []
    r = redis_server.client()
    assert r.keys(f"running:task:{task_id}:*") == []
    assert r.hget(f"running_tool:nmap:{worker.hostname}", task_id) is None
    assert status(redis_server, task_id)["state"] == "queued"
    assert r.hget(f"fw:lease:{task_id}", "attempts") == "0"  # a shutdown is not the task's fault
    worker.start()
    scanledger.wait_for(lambda f: len(f.uploads) == 1, timeout=120)
    wait_until(lambda: status(redis_server, task_id).get("state") == "completed", what="completed")


def test_real_tasker_order_publish_before_tracking_is_not_a_stop(
    tasker, worker_factory, netns_lab, redis_server
) -> None:
    """The real Tasker writes metadata and task sets just after publishing: an idle worker receives the
    message first. That must neither skip the task nor leave Tasker's keys behind."""
    worker_factory().start()
    project = uuid.uuid4()
    task_id = tasker.send_scan(**scan_fields(netns_lab.services, "80"), project=project, track_first=False)
    wait_until(lambda: status(redis_server, task_id).get("state") == "completed", what="completed")
    assert_clean_for_tasker(tasker, str(project))


def test_nmap_killed_from_outside_is_requeued_not_failed(
    tasker, worker_factory, scanledger, netns_lab, redis_server
) -> None:
    """The OOM killer or an operator killing nmap says nothing about the task: it runs again."""
    worker = worker_factory(ledger=scanledger).start()
    project = uuid.UUID(scanledger.project)
    task_id = tasker.send_scan(**slow_phase2(netns_lab.services), project=project, mode="append")
    wait_phase(redis_server, task_id, "service_scan", worker)
    import os
    import signal as sig

    for pid in worker.nmap_pids():
        os.kill(pid, sig.SIGKILL)
    scanledger.wait_for(lambda f: len(f.uploads) == 1, timeout=120)
    wait_until(lambda: status(redis_server, task_id).get("state") == "completed", what="completed")
    assert "re-queued the task" in worker.log()
    assert "attempt" not in status(redis_server, task_id).get("error", "")
    assert worker.alive()


def test_concurrency_setting_runs_scans_side_by_side(tasker, worker_factory, netns_lab, redis_server) -> None:
    worker = worker_factory(CONCURRENCY="2").start()
    first = tasker.send_scan(**slow_phase2(netns_lab.services))
    second = tasker.send_scan(**slow_phase2(netns_lab.services))
    wait_until(
        lambda: (
            {status(redis_server, t).get("state") for t in (first, second)} == {"service_scan"}
            and len(worker.nmap_pids()) == 2
        ),
        what="two scans at once",
    )
    assert worker.notify.wait_for(lambda line: line.count("service scan of") == 2)
    tasker.cancel([first, second])
    for task_id in (first, second):
        wait_until(lambda t=task_id: status(redis_server, t).get("state") == "cancelled", what="cancelled")


def test_messages_it_cannot_handle_do_not_take_the_worker_down(
    tasker, worker_factory, netns_lab, redis_server
) -> None:
    """Anyone on the broker can publish: odd AMQP header types on a scan message and malformed Celery
    control messages (sent to every instance at once) are dropped; the worker keeps serving."""
    import datetime
    import json as jsonlib

    from tests.support.tasker import celery_message

    worker = worker_factory().start()
    task_id = str(uuid.uuid4())
    fields = {**scan_fields(netns_lab.services, "80"), "project": str(uuid.uuid4())}
    body, headers, properties = celery_message(
        "project.nmap.scan", task_id, [fields], origin="t", reply_to="r"
    )
    headers["x-sent-at"] = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)  # an AMQP timestamp
    tasker.publish_raw(body, headers, properties)
    for control in ({"arguments": {}}, ["ping"], {"method": "ping", "reply_to": "x"}, "not json at all"):
        raw = control.encode() if isinstance(control, str) else jsonlib.dumps(control).encode()
        tasker.publish_raw(
            raw,
            {"clock": "abc"},
            {"content_type": "application/json", "content_encoding": "utf-8"},
            exchange="celery.pidbox",
            routing_key="",
        )
    time.sleep(1)
    assert worker.alive(), worker.log()[-3000:]
    assert worker.nodename in tasker.ping(timeout=2.0)
    good = tasker.send_scan(**scan_fields(netns_lab.services, "80"))
    wait_until(lambda: status(redis_server, good).get("state") == "completed", what="next task")


def test_the_same_instance_twice_refuses_to_start(tasker, worker_factory) -> None:
    first = worker_factory("1").start()
    # By hand beside the unit: same state dir. It would kill the first one's nmap as an orphan.
    again = worker_factory("1b", STATE_DIR=str(first.state_dir), NODE_NAME="worker1").start(wait_ready=False)
    assert again.proc is not None and again.proc.wait(30) == 2
    assert "STATE_DIR" in again.log() and "in use by another falcoria-worker run" in again.log()
    # A cloned host: same NODE_NAME@HOSTNAME, another machine (state dir). It would steal the leases.
    clone = worker_factory("1c", NODE_NAME="worker1").start(wait_ready=False)
    assert clone.proc is not None and clone.proc.wait(30) == 2
    assert "HOSTNAME" in clone.log() and f"node {first.nodename} is already run by" in clone.log()
    assert first.alive()
    assert first.nodename in tasker.ping(timeout=2.0)
