"""A stand-in for the real Falcoria Tasker, written from the wire contract and not from our code.

It imports nothing from falcoria_worker on purpose: if the worker and this Tasker shared a helper, a bug in
that helper would cancel out. Messages are built by hand and published with py-amqp, Redis is written with
redis-py, and Celery itself is used only where Tasker uses its remote control (revoke, ping).

What it mirrors (contract §1.3-§1.5, §2, §3; Falcoria/tasker app/tasks/service.py, redis_tracker.py,
app/workers/service.py):
  send_scan    lock SET NX EX timeout+10 (refused -> None, as Tasker reports "already in queue"),
               SADD project/user/project-ip sets, HSET metadata {ip, ports}, and the protocol-2 message
               on nmap_exchange/nmap.scan after declaring the exchange, queue and binding as Tasker does
  cancel       one project.nmap.cancel broadcast on the nmap_cancel_queue fanout exchange
  update_ip    one worker.update_ip broadcast on worker_service_broadcast
  revoke       celery control.revoke(id, terminate=False)
  stop_project revoke_project_tasks: SMEMBERS, revoke + metadata cleanup per task, one cancel broadcast
  ping         celery control.inspect().ping(); refresh_liveness() also does Tasker's worker:{host} update
  status       get_scan_status: active_or_queued from the project set, running from running:task:*:host:*

Real Tasker writes its Redis keys *after* publishing; by default this one writes them first so a fast
worker never sees a task without metadata. `track_first=False` reproduces Tasker's real order.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import amqp
import kombu.pools
import redis
from celery import Celery

SCAN_TASK = "project.nmap.scan"
CANCEL_TASK = "project.nmap.cancel"
UPDATE_IP_TASK = "worker.update_ip"
SCAN_EXCHANGE = "nmap_exchange"
SCAN_QUEUE = "nmap_scan_queue"
SCAN_ROUTING_KEY = "nmap.scan"
CANCEL_EXCHANGE = "nmap_cancel_queue"
SERVICE_EXCHANGE = "worker_service_broadcast"
BROADCAST_ROUTING_KEY = "celery"  # kombu Broadcast's routing key
LIVENESS_TTL = 90  # Tasker's EXPIRE on worker:{host} after each ping round


class BrokerHandle(Protocol):
    host: str
    port: int
    user: str
    password: str
    vhost: str

    def url(self, scheme: str = "amqp") -> str: ...


def _kombu_json(value: object) -> object:
    # kombu >= 5.3 writes uuid.UUID like this; Tasker's model_dump() leaves project and user.id as UUIDs.
    if isinstance(value, uuid.UUID):
        return {"__type__": "uuid", "__value__": {"hex": value.hex}}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 1024 else text[:1021] + "..."  # Celery's argsrepr_maxsize


def celery_message(
    name: str, task_id: str, args: Sequence[Any], *, origin: str, reply_to: str
) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Body, headers and properties exactly as Celery 5.x send_task produces them (protocol 2)."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body = json.dumps([list(args), {}, embed], default=_kombu_json).encode()
    # Key order as Celery's as_task_v2 builds the dict (AMQP tables keep it).
    headers = {
        "lang": "py",
        "task": name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": _repr(list(args)),
        "kwargsrepr": "{}",
        "origin": origin,
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    properties = {
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_mode": 2,
        "priority": 0,
        "correlation_id": task_id,
        "reply_to": reply_to,
    }
    return body, headers, properties


class Tasker:
    """`redis_client` must decode responses (decode_responses=True), as the fixtures' clients do."""

    def __init__(self, broker: BrokerHandle, redis_client: redis.Redis) -> None:
        self.broker = broker
        self.r = redis_client
        self.origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self.reply_to = str(uuid.uuid4())  # Celery's app oid: one per Tasker process
        self._conn: amqp.Connection | None = None
        self._channel: Any = None
        self._celery: Celery | None = None

    # ------------------------------------------------------------------ connections

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = Celery("tasker", broker=self.broker.url())
        return self._celery

    def _chan(self) -> Any:
        if (
            self._conn is None
            or not self._conn.connected
            or self._channel is None
            or not self._channel.is_open
        ):
            self.close_amqp()
            # Publisher confirms: a publish to a missing exchange raises here instead of vanishing
            # (Celery's send_task would fail the same way on its next operation).
            self._conn = amqp.Connection(
                f"{self.broker.host}:{self.broker.port}",
                userid=self.broker.user,
                password=self.broker.password,
                virtual_host=self.broker.vhost,
                confirm_publish=True,
                connect_timeout=10,
            )
            self._conn.connect()
            self._channel = self._conn.channel()
        return self._channel

    def close_amqp(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except (OSError, amqp.exceptions.AMQPError):
                self._conn.collect()  # already dead (broker restarted): drop it without a handshake
        self._conn = None
        self._channel = None

    def close(self) -> None:
        self.close_amqp()
        if self._celery is not None:
            self._celery.close()
            self._celery = None

    # ------------------------------------------------------------------ publishing

    def declare_scan_queue(self) -> None:
        """Tasker's Queue(nmap_scan_queue, Exchange(nmap_exchange, topic), nmap.scan): durable, no args."""
        ch = self._chan()
        ch.exchange_declare(SCAN_EXCHANGE, "topic", durable=True, auto_delete=False)
        ch.queue_declare(SCAN_QUEUE, durable=True, exclusive=False, auto_delete=False)
        ch.queue_bind(SCAN_QUEUE, exchange=SCAN_EXCHANGE, routing_key=SCAN_ROUTING_KEY)

    def publish_raw(
        self,
        body: bytes,
        headers: Mapping[str, Any],
        properties: Mapping[str, Any],
        *,
        exchange: str = SCAN_EXCHANGE,
        routing_key: str = SCAN_ROUTING_KEY,
    ) -> None:
        """Publish any message, a forged or malformed one included, as anyone with broker access can.
        A connection the broker dropped (restart) is replaced once, as Celery's publish retry does."""
        message = amqp.Message(body, application_headers=dict(headers), **dict(properties))
        for attempt in (1, 2):
            try:
                if exchange == SCAN_EXCHANGE:
                    self.declare_scan_queue()
                self._chan().basic_publish(message, exchange=exchange, routing_key=routing_key)
                return
            except (OSError, amqp.exceptions.ConnectionError):
                self.close_amqp()
                if attempt == 2:
                    raise

    def _send(self, name: str, args: Sequence[Any], *, exchange: str, routing_key: str) -> str:
        task_id = str(uuid.uuid4())
        body, headers, properties = celery_message(
            name, task_id, args, origin=self.origin, reply_to=self.reply_to
        )
        self.publish_raw(body, headers, properties, exchange=exchange, routing_key=routing_key)
        return task_id

    def send_scan(self, *, track_first: bool = True, track_delay: float = 0.0, **fields: Any) -> str | None:
        """One scan task as Tasker's send_single_target sends it; None when the lock refuses it. With
        track_first=False, the Redis keys follow the publish after `track_delay` seconds (a busy Tasker,
        or one publishing a large batch before it tracks any of it)."""
        task: dict[str, Any] = {
            "ip": "127.0.0.1",
            "hostnames": [],
            "project": uuid.uuid4(),
            "open_ports_opts": "-n --max-retries 1 -Pn -p 22",
            "service_opts": "-sV -Pn",
            "timeout": 120,
            "include_services": True,
            "mode": "insert",
            "user": {"id": uuid.uuid4(), "username": "admin"},
            "open_ports_str": "22",
            "track_history": True,
        }
        task.update(fields)
        project, ip, ports = str(task["project"]), str(task["ip"]), str(task["open_ports_str"])
        lock = f"lock:project:{project}:ip:{ip}:ports:{ports}"
        if not self.r.set(lock, "1", ex=int(task["timeout"]) + 10, nx=True):
            return None
        task_id = str(uuid.uuid4())
        body, headers, properties = celery_message(
            SCAN_TASK, task_id, [task], origin=self.origin, reply_to=self.reply_to
        )
        if track_first:
            self._track(task_id, project, str(task["user"]["id"]), ip, ports)
        try:
            self.publish_raw(body, headers, properties)
        except Exception:
            self.r.delete(lock)  # Tasker releases the lock when the send fails
            raise
        if not track_first:
            time.sleep(track_delay)
            self._track(task_id, project, str(task["user"]["id"]), ip, ports)
        return task_id

    def _track(self, task_id: str, project: str, user_id: str, ip: str, ports: str) -> None:
        # Tasker's track_nmap_task (an async redis pipeline, hence MULTI/EXEC).
        with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(f"project:{project}:task_ids", task_id)
            pipe.sadd(f"user:{user_id}:task_ids", task_id)
            pipe.sadd(f"project:{project}:ip:{ip}:task_ids", task_id)
            pipe.hset(f"task:{task_id}:metadata:nmap", mapping={"ip": ip, "ports": ports})
            pipe.execute()

    def cancel(self, task_ids: Iterable[str]) -> str:
        # Tasker never declares the fanout exchange: without a worker having declared it this fails.
        return self._send(
            CANCEL_TASK,
            [{"task_ids": list(task_ids)}],
            exchange=CANCEL_EXCHANGE,
            routing_key=BROADCAST_ROUTING_KEY,
        )

    def update_ip(self) -> str:
        return self._send(UPDATE_IP_TASK, [], exchange=SERVICE_EXCHANGE, routing_key=BROADCAST_ROUTING_KEY)

    # ------------------------------------------------------------------ remote control

    def _control(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (OSError, amqp.exceptions.AMQPError):
            # kombu's connection pools are global per broker URL, so they outlive this Tasker and may hold
            # a connection the broker has closed since (vhost reset, broker restart), and Celery does not
            # retry a broadcast on it. Drop the pools, and the app that caches one, and try once more.
            kombu.pools.reset()
            if self._celery is not None:
                self._celery.close()
                self._celery = None
            return call()

    def revoke(self, task_id: str) -> None:
        self._control(lambda: self.celery.control.revoke(task_id, terminate=False))

    def stop_project(self, project: str | uuid.UUID) -> dict[str, Any]:
        """Tasker's revoke_project_tasks: the user set is not cleaned (a known upstream leak)."""
        project = str(project)
        task_ids = sorted(self.r.smembers(f"project:{project}:task_ids"))
        if not task_ids:
            return {"status": "no_tasks", "revoked": 0}
        revoked = 0
        for task_id in task_ids:
            self.revoke(task_id)
            meta = self.r.hgetall(f"task:{task_id}:metadata:nmap")
            if not meta:
                continue  # "No metadata for task": Tasker skips the cleanup
            with self.r.pipeline(transaction=True) as pipe:
                pipe.srem(f"project:{project}:task_ids", task_id)
                pipe.srem(f"project:{project}:ip:{meta['ip']}:task_ids", task_id)
                pipe.delete(f"task:{task_id}:metadata:nmap")
                pipe.delete(f"lock:project:{project}:ip:{meta['ip']}:ports:{meta['ports']}")
                pipe.execute()
            revoked += 1
        self.cancel(task_ids)
        return {"status": "stopped", "revoked": revoked}

    def ping(self, timeout: float = 1.0) -> dict[str, Any]:
        """{nodename: {"ok": "pong"}} of every worker that answered within `timeout`."""
        return self._control(lambda: self.celery.control.inspect(timeout=timeout).ping()) or {}

    def refresh_liveness(self, timeout: float = 1.0) -> list[str]:
        """One round of Tasker's liveness loop: ping, then HSET last_seen + EXPIRE 90 per hostname."""
        hostnames = []
        now = int(time.time())
        for node in self.ping(timeout):
            hostname = node.split("@", 1)[1] if "@" in node else node
            self.r.hset(f"worker:{hostname}", "last_seen", now)
            self.r.expire(f"worker:{hostname}", LIVENESS_TTL)
            hostnames.append(hostname)
        return hostnames

    # ------------------------------------------------------------------ what Tasker reads

    def status(self, project: str | uuid.UUID) -> dict[str, Any]:
        """Tasker's get_scan_status (running targets of all projects, as upstream does)."""
        active = self.r.smembers(f"project:{project}:task_ids")
        running = []
        for key in self.r.scan_iter(match="running:task:*:host:*", count=2000):
            running.extend(json.loads(entry) for entry in self.r.lrange(key, 0, -1))
        return {"active_or_queued": len(active), "running": len(running), "running_targets": running}

    def worker_ips(self) -> dict[str, dict[str, str]]:
        """Tasker's GET /workers/ips: every worker:* hash."""
        return {key.split(":", 1)[1]: self.r.hgetall(key) for key in self.r.keys("worker:*")}

    def locked_ips(self, project: str | uuid.UUID) -> set[str]:
        """Tasker's get_locked_ips: insert mode refuses these as "already in queue"."""
        keys = self.r.scan_iter(match=f"lock:project:{project}:ip:*:ports:*", count=2000)
        return {key.split(":")[4] for key in keys}

    def leftover_keys(self, ignore: Sequence[str] = ("worker:*",)) -> list[str]:
        """Every key in the db but those matching the `ignore` globs."""
        return sorted(k for k in self.r.keys("*") if not any(fnmatch.fnmatchcase(k, p) for p in ignore))
