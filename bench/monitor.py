"""Redis MONITOR as a timeline of what the worker did, with Redis' own microsecond timestamps.

Every step of a task leaves a Redis command: the lease claim, the PID written after nmap started and
removed after it was reaped, Tasker's cleanup, the delivery mark. Their times split a task's
publish-to-upload time into pick-up, nmap, the gap between the phases and the tail, without touching the
worker. MONITOR costs Redis a few microseconds per command, far below what is measured here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import redis


@dataclass(frozen=True)
class Command:
    time: float  # unix seconds, Redis' clock (the same host's clock as time.time())
    text: str
    client: str = ""  # "address:port" of the connection, "lua" for a command a script ran


class Monitor:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.commands: list[Command] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.client.ping()  # one more command wakes the blocked reader so it sees the flag
        self._thread.join(5)

    def _run(self) -> None:
        with self.client.monitor() as mon:
            for entry in mon.listen():
                if self._stop.is_set():
                    return
                with self._lock:
                    client = f"{entry['client_address']}:{entry['client_port']}".rstrip(":")
                    self.commands.append(Command(float(entry["time"]), str(entry["command"]), client))

    def about(self, task_id: str) -> list[Command]:
        with self._lock:
            return [c for c in self.commands if task_id in c.text]


@dataclass(frozen=True)
class Timeline:
    """Times (unix seconds) of one task's steps as Redis saw them; None when the step did not happen."""

    claimed: float | None
    pid_set: list[float]  # one per nmap started (after spawn; just before it runs)
    pid_cleared: list[float]  # one per nmap reaped
    cleaned: float | None  # Tasker's keys removed (the worker's MULTI with SREM ... task_ids)
    delivered: float | None  # status delivery=delivered, after ScanLedger's 200


def timeline(commands: list[Command], task_id: str, hostname: str) -> Timeline:
    pid_hash = f"running_tool:nmap:{hostname}"
    claimed = cleaned = delivered = None
    pid_set: list[float] = []
    pid_cleared: list[float] = []
    for c in commands:
        if task_id not in c.text:
            continue
        words = c.text.split()
        verb = words[0].upper() if words else ""
        if claimed is None and verb == "EVALSHA" and f"fw:lease:{task_id}" in c.text:
            claimed = c.time
        elif verb == "HSET" and len(words) > 1 and words[1] == pid_hash:
            pid_set.append(c.time)
        elif verb == "HDEL" and len(words) > 1 and words[1] == pid_hash:
            # clear_pid and the final cleanup both HDEL; only the first after each HSET ends an nmap.
            if len(pid_cleared) < len(pid_set):
                pid_cleared.append(c.time)
        elif cleaned is None and verb == "SREM" and ":task_ids" in c.text:
            cleaned = c.time
        elif delivered is None and verb == "HSET" and "delivered" in c.text and "status" in c.text:
            delivered = c.time
    return Timeline(claimed, pid_set, pid_cleared, cleaned, delivered)
