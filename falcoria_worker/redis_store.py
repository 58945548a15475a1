"""Redis: Tasker's tracking keys (contract §3), the task status, nmap PIDs, cleanup, revoke/delivery markers,
the worker IP, and the leases of the consumer loop. Every method is one round trip (a MULTI/EXEC pipeline
or a Lua script), so a half-applied change is never visible to Tasker or to another instance.

Leases (`fw:lease:{id}` HASH + `fw:leases` ZSET of deadlines). An instance claims a task before it acks the
message; the lease holds the raw message, so a task whose worker dies is requeued from Redis, not lost.
The lease's own `state` field (held, released, poison) is called its hold in the code, so as not to be
taken for the task's status:

    (absent) --claim--> held(owner, deadline, attempts=1) --heartbeat--> held(deadline extended)
    held --release(owner)--> (absent), fw:finished:{id} = owner  the task is finished
    held, deadline passed or owner restarting --requeue_lease--> released (message returned for the requeue)
    released or expired --claim--> held(attempts+1), or poison once attempts > max_attempts

Deadlines are unix seconds of Redis's own clock (`TIME` inside the scripts), the one clock every instance
sharing the Redis agrees on: a step of one instance's wall clock neither expires its leases nor keeps
another's alive. Tests pass `now` explicitly instead of waiting for time to pass.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Literal

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from falcoria_worker import keys, lease_scripts
from falcoria_worker.config import Settings, redis_kwargs
from falcoria_worker.model import ScanTask

METADATA_GRACE = 3.0  # seconds to wait for Tasker's tracking keys, written right after it publishes
TRACKING_FIRST_PAUSE = 0.005  # s between the first two looks for them; doubled after each look
TRACKING_MAX_PAUSE = 1.0  # s: the pauses stop growing here (a check per second at worst)

ClaimResult = Literal["claimed", "busy", "poison"]
LeaseOfReport = Literal["released", "held", "lost"]

# KEYS: lock. ARGV: ttl. Tasker's lock (timeout+10 s from enqueue) can run out while a scan is still
# running, after which insert mode queues the same target again; extend it, never shorten it, and never
# create it (a stopped project deleted it on purpose).
_REFRESH_LOCK = """
local left = redis.call('TTL', KEYS[1])
if left >= 0 and left < tonumber(ARGV[1]) then
  return redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: node key. ARGV: identity. Compare and delete: another machine may have claimed the name since.
_RELEASE_NODE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def redis_client(settings: Settings) -> redis.Redis:
    """The worker's Redis client: text replies, and timeouts so that a dead Redis cannot hang the loop.

    One quick retry only: redis-py's default (three, with backoff) makes every call of an unreachable
    Redis take seconds, and the run loop and the scan threads have better things to do meanwhile; the
    worker itself decides when to try again."""
    return redis.Redis(
        **redis_kwargs(settings),  # type: ignore[arg-type]
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(ConstantBackoff(0.05), 1),
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    def __init__(
        self, client: redis.Redis, hostname: str, *, status_ttl: int, marker_ttl: int | None = None
    ) -> None:
        self.r = client
        self.hostname = hostname
        self.status_ttl = status_ttl
        # Revoke/delivery markers and idle leases must outlive any queue wait; a week by default.
        self.marker_ttl = marker_ttl if marker_ttl is not None else status_ttl
        self._claim = client.register_script(lease_scripts.CLAIM)
        self._heartbeat = client.register_script(lease_scripts.HEARTBEAT)
        self._release = client.register_script(lease_scripts.RELEASE)
        self._requeue_lease = client.register_script(lease_scripts.REQUEUE_LEASE)
        self._owned_by = client.register_script(lease_scripts.OWNED_BY)
        self._refresh_lock = client.register_script(_REFRESH_LOCK)
        self._release_node = client.register_script(_RELEASE_NODE)
        self._write_status_held = client.register_script(lease_scripts.WRITE_STATUS_HELD)

    def ping(self) -> None:
        self.r.ping()

    # ------------------------------------------------------------------ Tasker's keys

    def mark_running(self, task_id: str, task: ScanTask, started_at: int) -> None:
        """RPUSH the RunningNmapTarget that Tasker's status lists. Its `worker` is the name of the
        `worker:{name}` key this store registers, as upstream writes it, so the Falcoria CLI can join the
        two. The list is emptied first: a redelivered task on the same host must still count as one."""
        entry = {
            "ip": task.ip,
            "hostnames": list(task.hostnames),
            "worker": self.hostname,
            "started_at": int(started_at),
        }
        key = keys.running_task_key(task_id, self.hostname)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.rpush(key, json.dumps(entry))
            pipe.execute()

    def set_pid(self, task_id: str, pid: int) -> None:
        # Under the name the upstream cancel task reads, so a mixed fleet still cancels by PID.
        self.r.hset(keys.pid_hash_key(self.hostname), task_id, pid)

    def clear_pid(self, task_id: str) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.pid_hash_key(self.hostname), task_id)
            pipe.hdel(keys.legacy_pid_hash_key(self.hostname), task_id)
            pipe.execute()

    def clear_running(self, task_id: str) -> None:
        """Remove only this instance's traces of a task (running entry, PIDs): for a task requeued or
        taken over by another instance, whose Tasker keys must stay."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.running_task_key(task_id, self.hostname))
            pipe.hdel(keys.pid_hash_key(self.hostname), task_id)
            pipe.hdel(keys.legacy_pid_hash_key(self.hostname), task_id)
            pipe.execute()

    def cleanup(self, task_id: str, task: ScanTask, *, include_lock: bool = True) -> None:
        """The upstream worker's cleanup (contract §3) in one MULTI/EXEC, after every outcome: Tasker's
        status drops the task, and insert mode accepts the target again.

        include_lock=False leaves the lock alone: for a task Tasker stopped, the lock of the same
        project/ip/ports may already belong to a newer task."""
        self._cleanup(
            task_id,
            project=task.project,
            user_id=task.user.id,
            ip=task.ip,
            open_ports_str=task.open_ports_str if include_lock else None,
        )

    def cleanup_partial(self, task_id: str, data: object) -> None:
        """Cleanup for a payload that failed validation: whatever keys its fields still name are removed,
        so that a rejected task does not stay "queued" in Tasker forever."""
        fields = data if isinstance(data, Mapping) else {}
        user = fields.get("user")
        self._cleanup(
            task_id,
            project=_key_part(fields.get("project")),
            user_id=_key_part(user.get("id")) if isinstance(user, Mapping) else None,
            ip=_key_part(fields.get("ip")),
            open_ports_str=_key_part(fields.get("open_ports_str")),
        )

    def _cleanup(
        self,
        task_id: str,
        *,
        project: str | None,
        user_id: str | None,
        ip: str | None,
        open_ports_str: str | None,
    ) -> None:
        h = self.hostname
        with self.r.pipeline(transaction=True) as pipe:
            # Both PID hash names: the builder's (which upstream cleans, a no-op) and the one written.
            pipe.hdel(keys.legacy_pid_hash_key(h), task_id)
            pipe.hdel(keys.pid_hash_key(h), task_id)
            pipe.delete(keys.running_task_key(task_id, h))
            if project is not None:
                pipe.srem(keys.project_tasks_key(project), task_id)
            if user_id is not None:
                pipe.srem(keys.user_tasks_key(user_id), task_id)
            if project is not None and ip is not None:
                pipe.srem(keys.project_ip_tasks_key(project, ip), task_id)
                if open_ports_str is not None:
                    pipe.delete(keys.lock_key(project, ip, open_ports_str))
                pipe.delete(keys.legacy_ip_task_lock_key(project, ip))
            pipe.delete(keys.metadata_key(task_id))
            pipe.delete(keys.legacy_scan_lock_key(h))
            pipe.execute()

    def metadata_exists(self, task_id: str) -> bool:
        return bool(self.r.exists(keys.metadata_key(task_id)))

    def tasker_stopped(self, task_id: str, task: ScanTask) -> bool:
        """Whether Tasker stopped the task: its metadata is gone *and* so is its lock.

        Tasker takes the lock before it publishes but writes the metadata only after publish returns
        (tasker:app/tasks/service.py send_single_nmap_task), and while it sends a batch its event loop
        runs other targets' blocking publishes first; an idle worker can receive the message before the
        metadata exists. Metadata missing with the lock present is such a just-sent task, not a stopped one.
        """
        metadata, lock = self._metadata_and_lock(task_id, task)
        return not metadata and not lock

    def _metadata_and_lock(self, task_id: str, task: ScanTask) -> tuple[bool, bool]:
        with self.r.pipeline(transaction=False) as pipe:
            pipe.exists(keys.metadata_key(task_id))
            pipe.exists(keys.lock_key(task.project, task.ip, task.open_ports_str))
            metadata, lock = pipe.execute()
        return bool(metadata), bool(lock)

    def refresh_lock(self, task: ScanTask, ttl: int) -> None:
        self._refresh_lock(keys=[keys.lock_key(task.project, task.ip, task.open_ports_str)], args=[ttl])

    def claim_node(self, nodename: str, identity: str, ttl: int) -> str | None:
        """Record that `identity` (machine and state dir) runs `nodename`; returns the other identity when
        a live one already does (its key is renewed with every lease heartbeat, so it expires ttl after
        that instance died)."""
        key = keys.node_key(nodename)
        if self.r.set(key, identity, nx=True, ex=ttl):
            return None
        holder = self.r.get(key)
        if holder is None or _text(holder) == identity:
            self.r.set(key, identity, ex=ttl)
            return None
        return _text(holder)

    def renew_node(self, nodename: str, identity: str, ttl: int) -> None:
        self.r.set(keys.node_key(nodename), identity, ex=ttl)

    def release_node(self, nodename: str, identity: str) -> None:
        """Delete the node's claim if it is still `identity`'s (a stopped instance leaves nothing behind)."""
        self._release_node(keys=[keys.node_key(nodename)], args=[identity])

    def register_ip(self, ip: str) -> None:
        self.r.hset(keys.worker_key(self.hostname), mapping={"ip": ip, "last_updated": int(time.time())})

    def forget_worker(self, name: str) -> bool:
        """Delete another name's worker key (the bare host's, once its instances register names of their
        own); True if there was one."""
        return bool(self.r.delete(keys.worker_key(name)))

    # ------------------------------------------------------------------ status (extension)

    def set_status(
        self,
        task_id: str,
        state: str,
        *,
        phase: str | None = None,
        percent: float | None = None,
        error: str | None = None,
        held_by: str | None = None,
        **extra: object,
    ) -> None:
        """Write `task:{id}:status`. phase/percent/error given as None are removed (a new state clears
        the previous phase's progress and an earlier attempt's error); other fields given as None are
        removed too, fields not given are kept (e.g. `worker`, `delivery`). With `held_by`, only while
        that owner holds the task's lease."""
        fields: dict[str, object] = {"state": str(state), "phase": phase, "percent": percent, "error": error}
        fields.update(extra)
        self._write_status(task_id, fields, held_by)

    def set_status_fields(self, task_id: str, **fields: object) -> None:
        """Add or change status fields without touching the state."""
        self._write_status(task_id, fields)

    def _write_status(self, task_id: str, fields: Mapping[str, object], held_by: str | None = None) -> None:
        key = keys.status_key(task_id)
        present = {k: str(v) for k, v in fields.items() if v is not None}
        present["updated_at"] = str(int(time.time()))
        absent = [k for k, v in fields.items() if v is None]
        if held_by is not None:
            pairs = [part for item in present.items() for part in item]
            args = [held_by, self.status_ttl, len(present), *pairs, *absent]
            self._write_status_held(keys=[key, keys.lease_key(task_id)], args=args)
            return
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=present)
            if absent:
                pipe.hdel(key, *absent)
            pipe.expire(key, self.status_ttl)
            pipe.execute()

    def get_status(self, task_id: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.r.hgetall(keys.status_key(task_id)).items()}

    # ------------------------------------------------------------------ markers (extension)

    def mark_revoked(self, task_ids: Iterable[str]) -> None:
        """Remember revoked ids for every instance: a revoke reaches only the nodes alive at the time, and a
        queued task may be delivered later to one that was not."""
        with self.r.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.set(keys.revoked_key(task_id), "1", ex=self.marker_ttl)
            pipe.execute()

    def is_revoked(self, task_id: str) -> bool:
        return bool(self.r.exists(keys.revoked_key(task_id)))

    def mark_delivered(self, task_id: str) -> None:
        self.r.set(keys.delivered_key(task_id), "1", ex=self.marker_ttl)

    def was_delivered(self, task_id: str) -> bool:
        return bool(self.r.exists(keys.delivered_key(task_id)))

    # ------------------------------------------------------------------ leases (extension)

    def claim(
        self,
        task_id: str,
        owner: str,
        ttl: float,
        message: bytes | str,
        max_attempts: int,
        *,
        now: float | None = None,
    ) -> ClaimResult:
        """Take a task before its message is acked. "busy": a live lease exists (a duplicate delivery);
        "poison": this is delivery number max_attempts+1 of a task whose workers kept dying."""
        result = self._claim(
            keys=[keys.lease_key(task_id), keys.LEASES_KEY],
            args=[task_id, owner, _clock_arg(now), ttl, message, max_attempts, self.marker_ttl],
        )
        return _text(result)  # type: ignore[return-value]

    def heartbeat(
        self, task_ids: Iterable[str], owner: str, ttl: float, *, now: float | None = None
    ) -> list[str]:
        """Extend the leases `owner` still holds; returns the ids it no longer holds (taken over)."""
        ids = list(task_ids)
        if not ids:
            return []
        lost = self._heartbeat(
            keys=[keys.LEASES_KEY, *(keys.lease_key(i) for i in ids)],
            args=[owner, _clock_arg(now), ttl, *ids],
        )
        return [_text(i) for i in lost]

    def release(self, task_id: str, owner: str) -> bool:
        """Delete a finished task's lease; False when another owner holds it now."""
        lease_keys = [keys.lease_key(task_id), keys.LEASES_KEY, keys.finished_key(task_id)]
        return bool(self._release(keys=lease_keys, args=[task_id, owner, self.marker_ttl]))

    def lease_of_report(self, task_id: str, owner: str) -> LeaseOfReport:
        """Whose a stored report is, by its task's lease: still "held" by `owner` (its release is on the
        way), "lost" (another instance holds, requeued or finished the task), else "released" (by
        `owner`, or so long ago that nothing is known: a takeover leaves its trace for the retention,
        and a report with no evidence against it is uploaded rather than lost)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hmget(keys.lease_key(task_id), "owner", "state")
        pipe.get(keys.finished_key(task_id))
        (lease_owner, hold), finished = pipe.execute()
        if hold is not None:
            return "held" if lease_owner == owner and hold == "held" else "lost"
        return "released" if finished in (None, owner) else "lost"

    def now(self) -> float:
        """Redis's clock, in which lease deadlines are kept."""
        seconds, microseconds = self.r.time()
        return seconds + microseconds / 1_000_000

    def expired(self, now: float) -> list[str]:
        """Leases whose deadline is before `now`, a time of Redis's clock (see `now()`)."""
        return [_text(i) for i in self.r.zrangebyscore(keys.LEASES_KEY, "-inf", now)]

    def requeue_lease(
        self,
        task_id: str,
        owner_hint: str | None,
        now: float | None = None,
        requeue_grace: float = 3600.0,
        *,
        refund: bool = False,
    ) -> str | None:
        """Take back a held lease that expired, or any held lease of `owner_hint` (an instance recovering
        its own tasks after a restart), and return its message for the requeue. Atomic: of several
        instances sweeping the same expired lease, exactly one gets the message. A released lease that
        nobody claimed within `requeue_grace` seconds is taken back again (its requeue was lost);
        the grace is long because a requeued task may wait in a busy queue for a while. `refund`
        takes back the attempt the claim counted (a requeue at shutdown is not the task's fault)."""
        message = self._requeue_lease(
            keys=[keys.lease_key(task_id), keys.LEASES_KEY],
            args=[task_id, _clock_arg(now), owner_hint or "", repr(requeue_grace), "1" if refund else "0"],
        )
        return None if message is None else _text(message)

    def owned_by(self, owner: str) -> list[str]:
        ids = self._owned_by(keys=[keys.LEASES_KEY], args=[owner, keys.lease_key("")])
        return [_text(i) for i in ids]

    def await_tracking(self, task_id: str, task: ScanTask | None, grace: float = METADATA_GRACE) -> bool:
        """Tasker takes its lock, publishes, and only then writes the metadata and the task sets, so a
        quick worker can get here first. Wait briefly for them, so that our cleanup never runs before
        Tasker's writes (which would leave Tasker counting the task forever). No wait when Tasker has
        clearly stopped the task (metadata and lock both gone) or the publisher is not Tasker. False when
        the grace ran out without either."""
        deadline = time.monotonic() + grace
        pause = TRACKING_FIRST_PAUSE
        while True:
            if self._tracking_settled(task_id, task):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # Growing pauses: Tasker usually writes within milliseconds, and a late Tasker must not cost
            # a command every few milliseconds for seconds.
            time.sleep(min(pause, left))
            pause = min(pause * 2, TRACKING_MAX_PAUSE)

    def _tracking_settled(self, task_id: str, task: ScanTask | None) -> bool:
        """Tasker's metadata is there, or Tasker has clearly stopped the task (metadata and lock both
        gone: nothing more will come). Without a parsed task there is no lock to look at."""
        if task is None:
            return self.metadata_exists(task_id)
        metadata, lock = self._metadata_and_lock(task_id, task)
        return metadata or not lock

    def lease_message(self, task_id: str) -> str | None:
        message = self.r.hget(keys.lease_key(task_id), "message")
        return None if message is None else _text(message)


def _clock_arg(now: float | None) -> str:
    return "" if now is None else repr(now)


def _key_part(value: object) -> str | None:
    """A field of an unvalidated payload as Tasker would have spelled it in a key, or None."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, Mapping) and value.get("__type__") == "uuid":
        inner = value.get("__value__")
        hex_text = inner.get("hex") if isinstance(inner, Mapping) else None
        try:
            return str(uuid.UUID(hex=hex_text)) if isinstance(hex_text, str) else None
        except ValueError:
            return None
    if isinstance(value, uuid.UUID):
        return str(value)
    return None
