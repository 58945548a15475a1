"""state.py against a real Redis: Tasker's keys, the cleanup pipeline, status, markers and leases.

Lease expiry is simulated by passing `now` explicitly; nothing here waits for time to pass."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from falcoria_worker import config, keys
from falcoria_worker.model import ScanTask, parse_task
from falcoria_worker.redis_store import RedisStore
from tests.support.services import RedisServer

HOST = "scanner-1"
STATUS_TTL = 3600
PROJECT = "a2783030-5c1e-4f0b-9d36-2f4a8e1b7c90"
USER = "8ce86274-1b2d-4c3e-8f4a-5b6c7d8e9f01"


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    redis_server.flush()
    with redis_server.client() as client:
        yield client


@pytest.fixture
def state(r: redis.Redis) -> RedisStore:
    return RedisStore(r, HOST, status_ttl=STATUS_TTL)


def make_task(open_ports_str: str = "1 22 55432 56379 58000", ip: str = "127.0.0.1") -> ScanTask:
    # As Tasker sends it (contract §1.5), typed UUIDs included.
    return parse_task(
        {
            "ip": ip,
            "hostnames": ["loopback.test"],
            "project": {"__type__": "uuid", "__value__": {"hex": uuid.UUID(PROJECT).hex}},
            "open_ports_opts": "-n -Pn -p 1,22",
            "service_opts": "-sV -Pn",
            "timeout": 120,
            "include_services": True,
            "mode": "append",
            "user": {"id": {"__type__": "uuid", "__value__": {"hex": uuid.UUID(USER).hex}}, "username": "a"},
            "open_ports_str": open_ports_str,
            "track_history": True,
        }
    )


def tasker_enqueue(r: redis.Redis, task_id: str, task: ScanTask) -> str:
    """Tasker's writes at enqueue (acquire_lock_ip_ports + track_nmap_task), spelled out independently."""
    lock = f"lock:project:{PROJECT}:ip:{task.ip}:ports:{task.open_ports_str}"
    assert r.set(lock, "1", ex=task.timeout + 10, nx=True)
    r.sadd(f"project:{PROJECT}:task_ids", task_id)
    r.sadd(f"user:{USER}:task_ids", task_id)
    r.sadd(f"project:{PROJECT}:ip:{task.ip}:task_ids", task_id)
    r.hset(f"task:{task_id}:metadata:nmap", mapping={"ip": task.ip, "ports": task.open_ports_str})
    return lock


# ------------------------------------------------------------------ Tasker's keys and cleanup


def test_after_cleanup_only_the_worker_key_remains(r: redis.Redis, state: RedisStore) -> None:
    """Mirror of the upstream [verified] fact: after a finished scan only worker:{host} remains."""
    task, task_id = make_task(), str(uuid.uuid4())
    lock = tasker_enqueue(r, task_id, task)
    assert " " in lock  # several ports: the key holds spaces
    state.register_ip("192.0.2.2")
    state.mark_running(task_id, task, started_at=1_700_000_000)
    state.set_pid(task_id, 4242)
    r.set(f"project:{PROJECT}:ip_task_lock:{task.ip}", "1")  # upstream keys nothing writes; cleanup DELs them
    r.set(f"scan:lock:{HOST}", "1")
    r.hset(f"running:tool:nmap:host:{HOST}", task_id, 4241)  # a stale PID under the builder's name

    state.cleanup(task_id, task)

    assert sorted(r.keys("*")) == [f"worker:{HOST}"]


def test_cleanup_of_one_task_leaves_other_tasks_alone(r: redis.Redis, state: RedisStore) -> None:
    task_a, task_b = make_task("22"), make_task("80 443")
    id_a, id_b = str(uuid.uuid4()), str(uuid.uuid4())
    tasker_enqueue(r, id_a, task_a)
    lock_b = tasker_enqueue(r, id_b, task_b)
    state.set_pid(id_a, 1)
    state.set_pid(id_b, 2)

    state.cleanup(id_a, task_a)

    assert r.smembers(f"project:{PROJECT}:task_ids") == {id_b}
    assert r.smembers(f"user:{USER}:task_ids") == {id_b}
    assert r.smembers(f"project:{PROJECT}:ip:127.0.0.1:task_ids") == {id_b}
    assert r.exists(lock_b, f"task:{id_b}:metadata:nmap") == 2
    assert r.hgetall(f"running_tool:nmap:{HOST}") == {id_b: "2"}


def test_cleanup_without_lock_keeps_a_newer_tasks_lock(r: redis.Redis, state: RedisStore) -> None:
    task, task_id = make_task(), str(uuid.uuid4())
    lock = tasker_enqueue(r, task_id, task)
    state.cleanup(task_id, task, include_lock=False)
    assert r.exists(lock)
    assert not r.exists(f"task:{task_id}:metadata:nmap")
    assert not r.sismember(f"project:{PROJECT}:task_ids", task_id)


def test_cleanup_partial_of_a_rejected_payload(r: redis.Redis, state: RedisStore) -> None:
    task, task_id = make_task("22"), str(uuid.uuid4())
    tasker_enqueue(r, task_id, task)
    payload = {
        "ip": "127.0.0.1",
        "project": {"__type__": "uuid", "__value__": {"hex": uuid.UUID(PROJECT).hex}},
        "user": {"id": USER},
        "open_ports_str": "22",
        "timeout": "not an int",  # why it was rejected
    }
    state.register_ip("192.0.2.2")
    state.cleanup_partial(task_id, payload)
    assert sorted(r.keys("*")) == [f"worker:{HOST}"]


@pytest.mark.parametrize("payload", [None, [], "text", {"project": 5, "user": "x"}, {"ip": "1.2.3.4"}])
def test_cleanup_partial_of_garbage_removes_what_it_can(
    r: redis.Redis, state: RedisStore, payload: Any
) -> None:
    task_id = str(uuid.uuid4())
    r.hset(f"task:{task_id}:metadata:nmap", mapping={"ip": "x", "ports": "y"})
    state.cleanup_partial(task_id, payload)
    assert not r.exists(f"task:{task_id}:metadata:nmap")


def test_running_entry_is_taskers_running_nmap_target(r: redis.Redis, state: RedisStore) -> None:
    task, task_id = make_task(), str(uuid.uuid4())
    state.mark_running(task_id, task, started_at=1_700_000_123)
    state.mark_running(task_id, task, started_at=1_700_000_124)  # redelivered
    entries = r.lrange(f"running:task:{task_id}:host:{HOST}", 0, -1)
    assert [json.loads(e) for e in entries] == [
        {
            "ip": "127.0.0.1",
            "hostnames": ["loopback.test"],
            "worker": HOST,  # the name of the worker:{name} key, as upstream writes it
            "started_at": 1_700_000_124,
        }
    ]
    assert r.type(f"running:task:{task_id}:host:{HOST}") == "list"
    assert r.ttl(f"running:task:{task_id}:host:{HOST}") == -1


def test_an_instance_with_a_source_address_names_itself_in_its_entries(r: redis.Redis) -> None:
    settings = config.parse({"HOSTNAME": HOST, "INSTANCE": "2", "SOURCE_ADDRESS": "203.0.113.7"})
    state, task_id = RedisStore(r, settings.hostname, status_ttl=STATUS_TTL), str(uuid.uuid4())
    state.register_ip("203.0.113.7")
    state.mark_running(task_id, make_task(), started_at=1_700_000_123)
    state.set_pid(task_id, 4242)
    (entry,) = r.lrange(f"running:task:{task_id}:host:{HOST}-2", 0, -1)
    assert json.loads(entry)["worker"] == f"{HOST}-2"
    assert r.hget(f"worker:{HOST}-2", "ip") == "203.0.113.7"
    assert r.hget(f"running_tool:nmap:{HOST}-2", task_id) == "4242"
    assert not r.exists(f"worker:{HOST}")


def test_pid_is_written_where_upstream_cancel_reads_it(r: redis.Redis, state: RedisStore) -> None:
    state.set_pid("t1", 4242)
    assert r.hget(f"running_tool:nmap:{HOST}", "t1") == "4242"
    r.hset(f"running:tool:nmap:host:{HOST}", "t1", 1)
    state.clear_pid("t1")
    assert not r.exists(f"running_tool:nmap:{HOST}", f"running:tool:nmap:host:{HOST}")


def test_clear_running_keeps_taskers_keys(r: redis.Redis, state: RedisStore) -> None:
    task, task_id = make_task(), str(uuid.uuid4())
    lock = tasker_enqueue(r, task_id, task)
    state.mark_running(task_id, task, started_at=1)
    state.set_pid(task_id, 7)
    state.clear_running(task_id)
    assert not r.exists(f"running:task:{task_id}:host:{HOST}", f"running_tool:nmap:{HOST}")
    assert r.exists(lock, f"task:{task_id}:metadata:nmap") == 2
    assert r.sismember(f"project:{PROJECT}:task_ids", task_id)


def test_release_node_deletes_only_its_own_claim(r: redis.Redis, state: RedisStore) -> None:
    assert state.claim_node(f"worker1@{HOST}", "machine-a:/state", ttl=60) is None
    state.release_node(f"worker1@{HOST}", "machine-b:/state")  # not the holder: kept
    assert r.get(f"fw:node:worker1@{HOST}") == "machine-a:/state"
    state.release_node(f"worker1@{HOST}", "machine-a:/state")
    assert r.exists(f"fw:node:worker1@{HOST}") == 0


def test_metadata_exists(r: redis.Redis, state: RedisStore) -> None:
    task, task_id = make_task(), str(uuid.uuid4())
    assert not state.metadata_exists(task_id)
    tasker_enqueue(r, task_id, task)
    assert state.metadata_exists(task_id)


def test_tasker_stopped_needs_both_metadata_and_lock_gone(r: redis.Redis, state: RedisStore) -> None:
    task, task_id = make_task(), str(uuid.uuid4())
    lock = keys.lock_key(PROJECT, task.ip, task.open_ports_str)
    r.set(lock, "1", ex=130)  # Tasker locked and published, its metadata write still on its way
    assert not state.tasker_stopped(task_id, task)
    r.hset(f"task:{task_id}:metadata:nmap", mapping={"ip": task.ip, "ports": task.open_ports_str})
    r.delete(lock)  # the lock ran out while the task waited in the queue
    assert not state.tasker_stopped(task_id, task)
    r.delete(f"task:{task_id}:metadata:nmap")  # Tasker's stop deletes both
    assert state.tasker_stopped(task_id, task)


def test_refresh_lock_extends_but_never_shortens_or_creates(r: redis.Redis, state: RedisStore) -> None:
    task = make_task()
    lock = keys.lock_key(PROJECT, task.ip, task.open_ports_str)
    state.refresh_lock(task, ttl=600)
    assert not r.exists(lock)  # Tasker's stop deleted it: it stays deleted
    r.set(lock, "1", ex=30)
    state.refresh_lock(task, ttl=600)
    assert 590 < r.ttl(lock) <= 600
    r.expire(lock, 5000)
    state.refresh_lock(task, ttl=600)
    assert r.ttl(lock) > 4000
    r.persist(lock)
    state.refresh_lock(task, ttl=600)
    assert r.ttl(lock) == -1


def test_register_ip_keeps_taskers_last_seen(r: redis.Redis, state: RedisStore) -> None:
    r.hset(f"worker:{HOST}", "last_seen", 5)
    r.expire(f"worker:{HOST}", 90)
    state.register_ip("192.0.2.2")
    fields = r.hgetall(f"worker:{HOST}")
    assert fields["ip"] == "192.0.2.2"
    assert fields["last_seen"] == "5"
    assert int(fields["last_updated"]) > 1_700_000_000


# ------------------------------------------------------------------ status and markers


def test_status_hash_fields_and_ttl(r: redis.Redis, state: RedisStore) -> None:
    state.set_status("t1", "received", worker=f"worker1@{HOST}")
    state.set_status("t1", "ports_scan", phase="ports_scan", percent=37.5)
    status = state.get_status("t1")
    assert status["state"] == "ports_scan"
    assert status["phase"] == "ports_scan"
    assert status["percent"] == "37.5"
    assert status["worker"] == f"worker1@{HOST}"  # kept: not given again
    assert int(status["updated_at"]) > 1_700_000_000
    assert r.type("task:t1:status") == "hash"
    assert 0 < r.ttl("task:t1:status") <= STATUS_TTL

    state.set_status("t1", "failed", error="nmap exited 1", delivery="none")
    status = state.get_status("t1")
    assert (status["state"], status["error"], status["delivery"]) == ("failed", "nmap exited 1", "none")
    assert "phase" not in status
    assert "percent" not in status

    state.set_status_fields("t1", delivery="delivered")
    assert state.get_status("t1")["state"] == "failed"
    assert state.get_status("t1")["delivery"] == "delivered"
    state.set_status("t1", "received", worker=f"worker1@{HOST}")
    assert "error" not in state.get_status("t1")


def test_revoked_and_delivered_markers_expire(r: redis.Redis) -> None:
    state = RedisStore(r, HOST, status_ttl=STATUS_TTL, marker_ttl=120)
    assert not state.is_revoked("a")
    state.mark_revoked(["a", "b"])
    state.mark_revoked([])
    assert state.is_revoked("a")
    assert state.is_revoked("b")
    assert 0 < r.ttl("fw:revoked:a") <= 120
    assert not state.was_delivered("a")
    state.mark_delivered("a")
    assert state.was_delivered("a")
    assert 0 < r.ttl("fw:delivered:a") <= 120


# ------------------------------------------------------------------ leases


def test_claim_heartbeat_release(r: redis.Redis, state: RedisStore) -> None:
    assert state.claim("t1", "A", 60, "message-1", 3, now=1000) == "claimed"
    assert state.claim("t1", "B", 60, "message-1", 3, now=1010) == "busy"
    assert state.claim("t1", "A", 60, "message-1", 3, now=1010) == "busy"  # a duplicate delivery to us
    assert state.lease_message("t1") == "message-1"
    assert state.owned_by("A") == ["t1"]
    assert state.owned_by("B") == []
    assert state.heartbeat(["t1"], "A", 60, now=1050) == []
    assert state.expired(1100) == []  # extended to 1110
    assert state.expired(1111) == ["t1"]
    assert not state.release("t1", "B")
    assert state.release("t1", "A")
    assert r.keys("fw:*") == ["fw:finished:t1"]  # who finished it, for its stored report
    assert 0 < r.ttl("fw:finished:t1") <= STATUS_TTL


def test_lease_deadlines_are_kept_on_redis_clock(r: redis.Redis, state: RedisStore) -> None:
    # Without an explicit `now`, the scripts read Redis's TIME: the caller's wall clock plays no part.
    before = state.now()
    assert state.claim("t1", "A", 60, "m", 3) == "claimed"
    deadline = float(r.hget("fw:lease:t1", "deadline"))
    assert before + 60 <= deadline <= state.now() + 60
    assert state.heartbeat(["t1"], "A", 600) == []
    assert float(r.hget("fw:lease:t1", "deadline")) >= before + 600
    assert state.expired(state.now()) == []
    assert state.requeue_lease("t1", None) is None  # held and not expired on Redis's clock
    assert state.requeue_lease("t1", "A") == "m"  # its owner recovering it after a restart
    assert float(r.hget("fw:lease:t1", "deadline")) >= before + 3600  # re-publish grace, Redis's clock


def test_lease_keeps_bytes_messages_and_has_a_retention_ttl(r: redis.Redis) -> None:
    state = RedisStore(r, HOST, status_ttl=STATUS_TTL, marker_ttl=500)
    assert state.claim("t1", "A", 60, b'{"body": "\\u00e9"}', 3) == "claimed"
    assert state.lease_message("t1") == '{"body": "\\u00e9"}'
    assert 0 < r.ttl("fw:lease:t1") <= 500


def test_heartbeat_after_losing_the_lease(state: RedisStore) -> None:
    assert state.claim("t1", "A", 60, "m", 5, now=0) == "claimed"
    assert state.claim("t2", "A", 60, "m2", 5, now=0) == "claimed"
    # A froze; at t=100 the sweep of B finds t1 expired and re-publishes it; B then claims it.
    assert state.expired(100) == ["t1", "t2"]
    assert state.requeue_lease("t1", None, 100) == "m"
    assert state.requeue_lease("t1", None, 100) is None  # already taken
    assert state.claim("t1", "B", 60, "m", 5, now=101) == "claimed"
    # A wakes up: t1 is lost, t2 (expired but untouched) is still A's.
    assert state.heartbeat(["t1", "t2"], "A", 60, now=102) == ["t1"]
    assert state.expired(150) == []
    assert state.owned_by("A") == ["t2"]
    assert state.owned_by("B") == ["t1"]
    assert not state.release("t1", "A")


def test_requeue_lease_refuses_a_live_lease_of_another_owner(state: RedisStore) -> None:
    assert state.claim("t1", "A", 60, "m", 3, now=0) == "claimed"
    assert state.requeue_lease("t1", None, 30) is None
    assert state.requeue_lease("t1", "B", 30) is None
    assert state.requeue_lease("never-claimed", None, 30) is None
    # The owner restarting recovers its own live lease at once.
    assert state.requeue_lease("t1", "A", 30) == "m"
    assert state.owned_by("A") == []
    assert state.expired(30 + 3599) == []  # released: waiting to be claimed again


def test_lost_requeue_is_taken_back_after_the_grace(state: RedisStore) -> None:
    assert state.claim("t1", "A", 60, "m", 3, now=0) == "claimed"
    assert state.requeue_lease("t1", None, 100, requeue_grace=500) == "m"
    # The sweeper died before its publish reached the broker: nobody claims t1.
    assert state.requeue_lease("t1", None, 599, requeue_grace=500) is None
    assert state.expired(601) == ["t1"]
    assert state.requeue_lease("t1", None, 601, requeue_grace=500) == "m"
    # Once claimed again, the re-publish deadline is gone.
    assert state.claim("t1", "B", 60, "m", 3, now=602) == "claimed"
    assert state.requeue_lease("t1", None, 650, requeue_grace=500) is None


def test_a_stored_report_is_ours_only_while_no_other_instance_owns_its_task(state: RedisStore) -> None:
    assert state.claim("t1", "A", 60, "m", 5, now=0) == "claimed"
    assert state.lease_of_report("t1", "A") == "held"  # our release is on the way
    assert state.lease_of_report("t1", "B") == "lost"
    assert state.release("t1", "A")
    assert state.lease_of_report("t1", "A") == "released"
    assert state.lease_of_report("t1", "B") == "lost"
    # A was cut off past its lease: B's sweep requeued it, B claimed it, finished and released it.
    assert state.claim("t2", "A", 60, "m", 5, now=0) == "claimed"
    assert state.requeue_lease("t2", None, 200) == "m"
    assert state.lease_of_report("t2", "A") == "lost"  # requeued: someone runs it again
    assert state.claim("t2", "B", 60, "m", 5, now=201) == "claimed"
    assert state.lease_of_report("t2", "A") == "lost"
    assert not state.release("t2", "A")
    assert state.release("t2", "B")
    assert state.lease_of_report("t2", "A") == "lost"
    # Nothing known (older than the retention): uploaded rather than lost.
    assert state.lease_of_report("t3", "A") == "released"


def test_a_status_write_held_by_a_lease_is_dropped_once_the_lease_is_gone(state: RedisStore) -> None:
    # A write of a cut-off copy, delivered when the partition heals, must not undo the new owner's.
    assert state.claim("t1", "A", 60, "m", 5, now=0) == "claimed"
    state.set_status("t1", "ports_scan", phase="ports", percent=5.0, held_by="A")
    assert state.get_status("t1")["state"] == "ports_scan"
    assert state.get_status("t1")["percent"] == "5.0"
    state.set_status("t1", "service_scan", phase="services", held_by="A")
    assert "percent" not in state.get_status("t1")  # cleared, as without a lease
    assert state.requeue_lease("t1", None, 200) == "m"
    assert state.claim("t1", "B", 60, "m", 5, now=201) == "claimed"
    state.set_status("t1", "completed", held_by="B", worker="B")
    state.set_status("t1", "service_scan", phase="services", held_by="A")
    assert state.get_status("t1")["state"] == "completed"
    assert state.release("t1", "B")
    state.set_status("t1", "service_scan", phase="services", held_by="B")
    assert state.get_status("t1")["state"] == "completed"


def test_poison_after_max_attempts(r: redis.Redis, state: RedisStore) -> None:
    now = 0.0
    for attempt in range(1, 4):
        assert state.claim("t1", f"W{attempt}", 60, "m", 3, now=now) == "claimed"
        assert r.hget("fw:lease:t1", "attempts") == str(attempt)
        now += 100  # the worker died: the lease expires and a sweep re-publishes the message
        assert state.requeue_lease("t1", None, now) == "m"
    assert state.claim("t1", "W4", 60, "m", 3, now=now) == "poison"
    assert state.expired(10**10) == []
    assert state.claim("t1", "W5", 60, "m", 3, now=now) == "poison"  # still poison, not claimable
    assert state.release("t1", "W5")
    assert r.keys("fw:*") == ["fw:finished:t1"]


def test_expired_lease_redelivered_directly_counts_an_attempt(r: redis.Redis, state: RedisStore) -> None:
    # The broker redelivered the message itself (the worker died before its ack) after the lease ran out.
    assert state.claim("t1", "A", 60, "m", 2, now=0) == "claimed"
    assert state.claim("t1", "B", 60, "m", 2, now=61) == "claimed"
    assert r.hget("fw:lease:t1", "attempts") == "2"
    assert state.claim("t1", "C", 60, "m", 2, now=200) == "poison"


def _race(workers: int, attempt: Callable[[int], Any], redis_server: RedisServer) -> list[Any]:
    """Run attempt(i) in `workers` threads, each with its own connection, released at the same moment."""
    barrier = threading.Barrier(workers)
    results: list[Any] = [None] * workers

    def run(i: int) -> None:
        barrier.wait()
        results[i] = attempt(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_claims_have_exactly_one_winner(redis_server: RedisServer, r: redis.Redis) -> None:
    states = [RedisStore(redis_server.client(), HOST, status_ttl=STATUS_TTL) for _ in range(8)]
    for round_no in range(25):
        task_id = f"race-{round_no}"
        results = _race(8, lambda i, t=task_id: states[i].claim(t, f"owner-{i}", 60, "m", 3), redis_server)
        assert sorted(results) == ["busy"] * 7 + ["claimed"]
        winner = results.index("claimed")
        assert states[0].owned_by(f"owner-{winner}") == [task_id]
        assert states[0].release(task_id, f"owner-{winner}")
    for s in states:
        s.r.close()


def test_concurrent_requeues_hand_out_the_message_once(redis_server: RedisServer, r: redis.Redis) -> None:
    states = [RedisStore(redis_server.client(), HOST, status_ttl=STATUS_TTL) for _ in range(8)]
    for round_no in range(25):
        task_id = f"race-{round_no}"
        assert states[0].claim(task_id, "dead", 60, f"m{round_no}", 3, now=0) == "claimed"
        results = _race(8, lambda i, t=task_id: states[i].requeue_lease(t, None, 1000), redis_server)
        assert [m for m in results if m is not None] == [f"m{round_no}"]
    for s in states:
        s.r.close()


# ------------------------------------------------------------------ a Redis restart


def test_state_survives_a_redis_restart(redis_server: RedisServer, r: redis.Redis, state: RedisStore) -> None:
    assert state.claim("t1", "A", 60, "m", 3, now=0) == "claimed"
    redis_server.restart(keep_data=True)
    # The same client reconnects, and the scripts are loaded again (EVALSHA falls back to EVAL).
    assert state.owned_by("A") == ["t1"]
    assert state.heartbeat(["t1"], "A", 60, now=10) == []
    redis_server.restart()
    assert state.owned_by("A") == []
    assert state.claim("t1", "A", 60, "m", 3, now=20) == "claimed"


def test_flush_brings_back_a_stopped_server(redis_server: RedisServer, state: RedisStore) -> None:
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        state.ping()
    redis_server.flush()
    state.ping()
