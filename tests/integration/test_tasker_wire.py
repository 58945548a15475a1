"""The test Tasker against the real broker: its messages are what Celery's send_task produces (the code path
of the real Tasker), plain kombu consumers receive them and protocol.py + model.py understand them, and
the scan queue is declared exactly as Tasker declares it."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import amqp
import pytest
from celery import Celery
from kombu import Connection, Consumer, Exchange, Queue
from kombu.common import Broadcast
from kombu.pidbox import Mailbox

from falcoria_worker.errors import Rejected
from falcoria_worker.model import parse_cancel, parse_task
from falcoria_worker.protocol import decode_task_message
from falcoria_worker.redis_store import RedisStore
from tests.support.services import RabbitMQ, RedisServer
from tests.support.tasker import (
    CANCEL_EXCHANGE,
    SCAN_EXCHANGE,
    SCAN_QUEUE,
    SERVICE_EXCHANGE,
    Tasker,
)

HOST = "scanner-1"
NODE = f"worker1@{HOST}"


def tasker_celery(broker: RabbitMQ) -> Celery:
    """Celery configured as Falcoria/tasker app/celery_app.py configures it."""
    app = Celery("tasker", broker=broker.url())
    app.conf.update(
        task_queues=[
            Queue(SCAN_QUEUE, exchange=Exchange(SCAN_EXCHANGE, type="topic"), routing_key="nmap.scan"),
            Broadcast(name=CANCEL_EXCHANGE),
            Broadcast(name=SERVICE_EXCHANGE),
        ],
        task_routes={
            "project.nmap.scan": {"queue": SCAN_QUEUE},
            "project.nmap.cancel": {"queue": CANCEL_EXCHANGE},
            "worker.update_ip": {"queue": SERVICE_EXCHANGE},
        },
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
    )
    return app


def get_one(broker: RabbitMQ, queue: str) -> amqp.Message:
    conn = broker.connection()
    try:
        message = conn.channel().basic_get(queue, no_ack=True)
    finally:
        conn.close()
    assert message is not None, f"nothing in {queue}"
    return message


def consume(broker: RabbitMQ, queues: list[Queue], count: int, publish: Callable[[], Any]) -> list[Any]:
    """Declare `queues`, run publish(), and return `count` raw kombu messages (acked)."""
    got: list[Any] = []
    with Connection(broker.url()) as conn:
        with Consumer(conn.channel(), queues=queues, on_message=got.append, no_ack=False):
            publish()
            while len(got) < count:
                conn.drain_events(timeout=10)
        for message in got:
            message.ack()
    return got


def decode(message: Any):
    return decode_task_message(message.headers, message.body, message.content_type, message.content_encoding)


def worker_scan_queue() -> Queue:
    """The scan queue as worker.py declares it (kombu, durable, no arguments)."""
    exchange = Exchange(SCAN_EXCHANGE, type="topic", durable=True)
    return Queue(SCAN_QUEUE, exchange=exchange, routing_key="nmap.scan", durable=True)


def worker_broadcast_queue(name: str) -> Queue:
    exchange = Exchange(name, type="fanout", durable=True, auto_delete=False)
    return Queue(f"bcast.{uuid.uuid4()}", exchange=exchange, routing_key="celery", auto_delete=True)


# ------------------------------------------------------------------ fidelity to Celery's send_task


def test_scan_message_is_what_celery_send_task_publishes(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    data = {
        "ip": "127.0.0.1",
        "hostnames": ["loopback.test"],
        "project": uuid.uuid4(),
        "open_ports_opts": "-n --max-retries 1 -Pn -p 1,22",
        "service_opts": "-sV -Pn",
        "timeout": 120,
        "include_services": True,
        "mode": "append",
        "user": {"id": uuid.uuid4(), "username": "admin"},
        "open_ports_str": "1 22",
        "track_history": True,
    }
    app = tasker_celery(clean_broker)
    try:
        real_id = app.send_task(
            name="project.nmap.scan", args=[data], exchange=SCAN_EXCHANGE, routing_key="nmap.scan"
        ).id
    finally:
        app.close()
    real = get_one(clean_broker, SCAN_QUEUE)
    ours_id = tasker.send_scan(**data)
    ours = get_one(clean_broker, SCAN_QUEUE)

    assert ours.body == real.body  # same args -> the same bytes, typed UUIDs included
    assert ours.delivery_info["exchange"] == real.delivery_info["exchange"] == SCAN_EXCHANGE
    assert ours.delivery_info["routing_key"] == real.delivery_info["routing_key"] == "nmap.scan"
    real_headers = dict(real.properties.pop("application_headers"))
    our_headers = dict(ours.properties.pop("application_headers"))
    assert list(our_headers) == list(real_headers)  # same keys, same order
    assert (real_headers["id"], real_headers["root_id"], real.properties["correlation_id"]) == (real_id,) * 3
    assert (our_headers["id"], our_headers["root_id"], ours.properties["correlation_id"]) == (ours_id,) * 3
    # Celery 5.7 sends ignore_result null; the Tasker capture of contract §1.5 (5.6) has false.
    assert real_headers.pop("ignore_result") is None
    assert our_headers.pop("ignore_result") is False
    for name in ("id", "root_id", "origin"):
        real_headers.pop(name)
        our_headers.pop(name)
    assert our_headers == real_headers  # argsrepr included
    for name in ("correlation_id", "reply_to"):
        assert ours.properties.pop(name)
        assert real.properties.pop(name)
    assert ours.properties == real.properties
    assert ours.properties == {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 0,
    }


def test_cancel_is_what_celery_send_task_broadcasts(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    conn = clean_broker.connection()
    ch = conn.channel()
    ch.exchange_declare(CANCEL_EXCHANGE, "fanout", durable=True, auto_delete=False)
    ch.queue_declare("probe", auto_delete=False)
    ch.queue_bind("probe", CANCEL_EXCHANGE, "celery")
    conn.close()
    app = tasker_celery(clean_broker)
    try:
        app.send_task(name="project.nmap.cancel", args=[{"task_ids": ["a", "b"]}], queue=CANCEL_EXCHANGE)
    finally:
        app.close()
    real = get_one(clean_broker, "probe")
    tasker.cancel(["a", "b"])
    ours = get_one(clean_broker, "probe")
    assert ours.body == real.body
    assert (ours.delivery_info["exchange"], ours.delivery_info["routing_key"]) == (
        real.delivery_info["exchange"],
        real.delivery_info["routing_key"],
    )
    assert list(ours.properties["application_headers"]) == list(real.properties["application_headers"])


# ------------------------------------------------------------------ consumed by plain kombu, understood by us


def test_scan_consumed_by_kombu_decodes_and_parses(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    project, user = uuid.uuid4(), uuid.uuid4()
    task_id = None

    def publish() -> None:
        nonlocal task_id
        task_id = tasker.send_scan(
            ip="127.0.0.1",
            hostnames=["loopback.test"],
            project=project,
            user={"id": user, "username": "admin"},
            open_ports_opts="-n -Pn -p 1,22,80",
            open_ports_str="1 22 80",
            mode="append",
        )

    (message,) = consume(clean_broker, [worker_scan_queue()], 1, publish)
    msg = decode(message)
    assert (msg.name, msg.task_id, msg.kwargs) == ("project.nmap.scan", task_id, {})
    task = parse_task(msg.args[0])
    assert (task.project, task.user.id, task.ip) == (str(project), str(user), "127.0.0.1")
    assert task.open_ports_str == "1 22 80"
    assert task.hostnames == ("loopback.test",)
    assert message.delivery_info["routing_key"] == "nmap.scan"


def test_send_scan_writes_taskers_keys(tasker: Tasker) -> None:
    project, user = uuid.uuid4(), uuid.uuid4()
    task_id = tasker.send_scan(project=project, user={"id": user, "username": "u"}, open_ports_str="22 80")
    r = tasker.r
    lock = f"lock:project:{project}:ip:127.0.0.1:ports:22 80"
    assert 0 < r.ttl(lock) <= 130  # timeout + 10
    assert r.smembers(f"project:{project}:task_ids") == {task_id}
    assert r.smembers(f"user:{user}:task_ids") == {task_id}
    assert r.smembers(f"project:{project}:ip:127.0.0.1:task_ids") == {task_id}
    assert r.hgetall(f"task:{task_id}:metadata:nmap") == {"ip": "127.0.0.1", "ports": "22 80"}
    assert tasker.locked_ips(project) == {"127.0.0.1"}
    assert tasker.status(project) == {"active_or_queued": 1, "running": 0, "running_targets": []}
    # The lock refuses the same target again, as Tasker's insert mode reports "already in queue".
    assert tasker.send_scan(project=project, open_ports_str="22 80") is None


def test_broadcasts_reach_every_consumer(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    queues = [worker_broadcast_queue(CANCEL_EXCHANGE), worker_broadcast_queue(SERVICE_EXCHANGE)]
    got = consume(clean_broker, queues, 2, lambda: (tasker.cancel(["t-1", "t-2"]), tasker.update_ip()))
    by_name = {decode(m).name: decode(m) for m in got}
    assert parse_cancel(by_name["project.nmap.cancel"].args[0]) == ("t-1", "t-2")
    assert by_name["worker.update_ip"].args == []
    assert {m.delivery_info["exchange"] for m in got} == {CANCEL_EXCHANGE, SERVICE_EXCHANGE}


def test_cancel_fails_when_no_worker_declared_the_fanout(tasker: Tasker) -> None:
    # Contract §1.3 [verified]: Tasker never declares the broadcast exchanges.
    with pytest.raises(amqp.exceptions.NotFound):
        tasker.cancel(["t-1"])


def test_forged_pickle_message_is_refused(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    headers = {"lang": "py", "task": "project.nmap.scan", "id": str(uuid.uuid4())}
    props = {"content_type": "application/x-python-serialize", "content_encoding": "binary"}
    publish = lambda: tasker.publish_raw(b"\x80\x04K\x01.", headers, props)  # noqa: E731
    (message,) = consume(clean_broker, [worker_scan_queue()], 1, publish)
    with pytest.raises(Rejected, match="pickle"):
        decode(message)


# ------------------------------------------------------------------ the queue declaration


def _queue_rows(broker: RabbitMQ) -> list[list[str]]:
    out = broker.rabbitmqctl(
        "list_queues",
        "-q",
        "-p",
        broker.vhost,
        "--no-table-headers",
        "name",
        "durable",
        "auto_delete",
        "arguments",
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def test_scan_queue_is_declared_exactly_as_tasker_declares_it(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    tasker.declare_scan_queue()
    assert _queue_rows(clean_broker) == [[SCAN_QUEUE, "true", "false", "[]"]]
    # The worker's declaration is equivalent: neither side's declare gets 406 PRECONDITION_FAILED.
    with Connection(clean_broker.url()) as conn:
        worker_scan_queue()(conn.channel()).declare()
    tasker.declare_scan_queue()
    tasker.send_scan()
    assert _queue_rows(clean_broker) == [[SCAN_QUEUE, "true", "false", "[]"]]
    # The check can fail: a queue with arguments (quorum, priority, DLX) breaks Tasker.
    with Connection(clean_broker.url()) as conn:
        other = Queue(
            SCAN_QUEUE,
            exchange=Exchange(SCAN_EXCHANGE, type="topic"),
            routing_key="nmap.scan",
            queue_arguments={"x-max-priority": 10},
        )
        with pytest.raises(conn.channel_errors) as info:
            other(conn.channel()).declare()
    assert "PRECONDITION_FAILED" in str(info.value)


# ------------------------------------------------------------------ remote control and Tasker's reads


class PidboxNode:
    """A Celery-compatible remote-control node (what the worker runs), recording what it was sent."""

    def __init__(self, broker: RabbitMQ, hostname: str) -> None:
        self.broker = broker
        self.hostname = hostname
        self.revoked: list[Any] = []
        self.revokes = threading.Semaphore(0)
        self.listening = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Connection(self.broker.url()) as conn:
            channel = conn.channel()
            node = Mailbox("celery", type="fanout", accept=["json"])(conn).Node(
                hostname=self.hostname,
                channel=channel,
                handlers={"ping": lambda _state, **_kw: {"ok": "pong"}, "revoke": self._revoke},
            )
            node.listen(channel=channel)
            self.listening.set()
            while not self.stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.05)

    def _revoke(self, _state: object, task_id: Any = None, **kwargs: Any) -> dict[str, str]:
        self.revoked.append((task_id, kwargs.get("terminate")))
        self.revokes.release()
        return {"ok": "revoked"}

    def __enter__(self) -> PidboxNode:
        self.thread.start()
        assert self.listening.wait(30)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


@pytest.fixture
def node(clean_broker: RabbitMQ) -> Iterator[PidboxNode]:
    with PidboxNode(clean_broker, NODE) as pidbox:
        yield pidbox


def test_ping_and_taskers_liveness_update(tasker: Tasker, node: PidboxNode) -> None:
    assert tasker.ping(timeout=2.0) == {NODE: {"ok": "pong"}}
    tasker.r.hset(f"worker:{HOST}", mapping={"ip": "192.0.2.2", "last_updated": 1})
    assert tasker.refresh_liveness(timeout=2.0) == [HOST]
    assert int(tasker.r.hget(f"worker:{HOST}", "last_seen")) > 1_700_000_000
    assert 0 < tasker.r.ttl(f"worker:{HOST}") <= 90
    assert tasker.worker_ips()[HOST]["ip"] == "192.0.2.2"


def test_stop_project_mirrors_taskers_revoke(
    tasker: Tasker, node: PidboxNode, clean_broker: RabbitMQ, redis_server: RedisServer
) -> None:
    project, user = uuid.uuid4(), uuid.uuid4()
    ids = [
        tasker.send_scan(project=project, user={"id": user, "username": "u"}, ip=ip)
        for ip in ("127.0.0.2", "127.0.0.3")
    ]
    result: dict[str, Any] = {}
    got = consume(
        clean_broker,
        [worker_broadcast_queue(CANCEL_EXCHANGE)],
        1,
        lambda: result.update(tasker.stop_project(project)),
    )
    assert result == {"status": "stopped", "revoked": 2}
    assert parse_cancel(decode(got[0]).args[0]) == tuple(sorted(ids))
    # Each revoke is broadcast without terminate; it reaches a node that is listening.
    assert node.revokes.acquire(timeout=30)
    assert node.revokes.acquire(timeout=30)
    assert sorted(node.revoked) == sorted((i, False) for i in ids)
    # Tasker cleans everything but the user set (the upstream leak) and leaves the queued messages.
    assert tasker.leftover_keys() == [f"user:{user}:task_ids"]
    assert tasker.status(project)["active_or_queued"] == 0
    assert tasker.stop_project(project) == {"status": "no_tasks", "revoked": 0}
    rows = clean_broker.rabbitmqctl(
        "list_queues", "-q", "-p", clean_broker.vhost, "--no-table-headers", "name", "messages"
    ).stdout.splitlines()
    assert f"{SCAN_QUEUE}\t2" in rows


def test_status_counts_what_the_worker_writes(tasker: Tasker, redis_server: RedisServer) -> None:
    project, user = uuid.uuid4(), uuid.uuid4()
    task_id = tasker.send_scan(project=project, user={"id": user, "username": "admin"}, hostnames=["a.test"])
    state = RedisStore(redis_server.client(), HOST, status_ttl=60)
    message_task = parse_task(
        {
            "ip": "127.0.0.1",
            "hostnames": ["a.test"],
            "project": str(project),
            "open_ports_opts": "-p 22",
            "service_opts": "-sV",
            "timeout": 120,
            "include_services": True,
            "mode": "insert",
            "user": {"id": str(user), "username": "admin"},
            "open_ports_str": "22",
        }
    )
    state.register_ip("192.0.2.2")
    state.mark_running(task_id, message_task, started_at=1_700_000_000)
    status = tasker.status(project)
    assert (status["active_or_queued"], status["running"]) == (1, 1)
    assert status["running_targets"] == [
        {"ip": "127.0.0.1", "hostnames": ["a.test"], "worker": HOST, "started_at": 1_700_000_000}
    ]
    state.cleanup(task_id, message_task)
    assert tasker.status(project) == {"active_or_queued": 0, "running": 0, "running_targets": []}
    assert tasker.leftover_keys() == []
    assert tasker.locked_ips(project) == set()


def test_tasker_publishes_again_after_a_broker_restart(tasker: Tasker, clean_broker: RabbitMQ) -> None:
    first = tasker.send_scan(ip="127.0.0.2")
    clean_broker.restart()
    second = tasker.send_scan(ip="127.0.0.3")
    # The durable queue and the persistent message survived the restart; the new one joined it.
    ids = [decode(m).task_id for m in consume(clean_broker, [worker_scan_queue()], 2, lambda: None)]
    assert ids == [first, second]
