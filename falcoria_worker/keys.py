"""Redis key names: Tasker's keys (contract §3, spelled exactly as falcoria-common builds them) and the
worker's own extension keys. Pure string functions; nothing here is normalised, because Tasker looks the
keys up by the very text it wrote (the lock key carries `open_ports_str` verbatim, spaces included)."""

from __future__ import annotations

# --- Tasker's keys (contract §3) -----------------------------------------------------------------------


def lock_key(project: str, ip: str, open_ports_str: str) -> str:
    """Tasker's "already in queue" lock (SET NX EX timeout+10 at enqueue)."""
    return f"lock:project:{project}:ip:{ip}:ports:{open_ports_str}"


def project_tasks_key(project: str) -> str:
    """SET of the project's queued/running task ids: Tasker's `active_or_queued` count."""
    return f"project:{project}:task_ids"


def user_tasks_key(user_id: str) -> str:
    return f"user:{user_id}:task_ids"


def project_ip_tasks_key(project: str, ip: str) -> str:
    return f"project:{project}:ip:{ip}:task_ids"


def metadata_key(task_id: str) -> str:
    """HASH {ip, ports} Tasker writes at enqueue and deletes on stop: its absence means "stopped"."""
    return f"task:{task_id}:metadata:nmap"


def running_task_key(task_id: str, hostname: str) -> str:
    """LIST with one RunningNmapTarget JSON; Tasker's status SCANs `running:task:*:host:*`."""
    return f"running:task:{task_id}:host:{hostname}"


def pid_hash_key(hostname: str) -> str:
    """HASH task_id -> nmap PID, under the name the upstream worker actually writes and cancels from."""
    return f"running_tool:nmap:{hostname}"


def legacy_pid_hash_key(hostname: str) -> str:
    """The name falcoria-common's builder gives the PID hash (upstream cleanup HDELs here, a no-op there);
    we clean both so that neither can hold a stale PID."""
    return f"running:tool:nmap:host:{hostname}"


def worker_key(hostname: str) -> str:
    """HASH {ip, last_updated} (worker) + last_seen (Tasker's ping loop, EXPIRE 90)."""
    return f"worker:{hostname}"


def legacy_ip_task_lock_key(project: str, ip: str) -> str:
    """Nothing writes it; the upstream worker DELs it after cleanup, so cleanup deletes it too."""
    return f"project:{project}:ip_task_lock:{ip}"


def legacy_scan_lock_key(hostname: str) -> str:
    """Nothing writes it; the upstream cancel task DELs it, so cleanup deletes it too."""
    return f"scan:lock:{hostname}"


# --- extension keys (ours; documented in the README) ---------------------------------------------------

LEASES_KEY = "fw:leases"
"""ZSET task_id -> lease deadline (unix seconds): the index `expired()` reads."""


def status_key(task_id: str) -> str:
    """HASH state, phase, percent, error, worker, updated_at (with a TTL)."""
    return f"task:{task_id}:status"


def lease_key(task_id: str) -> str:
    """HASH owner, deadline, attempts, message, state of a task some instance has taken off the queue."""
    return f"fw:lease:{task_id}"


def revoked_key(task_id: str) -> str:
    """STRING with a TTL: a Celery revoke seen by any instance, so that every instance honours it."""
    return f"fw:revoked:{task_id}"


def delivered_key(task_id: str) -> str:
    """STRING with a TTL: the task's report reached ScanLedger (a redelivered copy must not scan again)."""
    return f"fw:delivered:{task_id}"


def finished_key(task_id: str) -> str:
    """STRING with a TTL: the owner whose release finished the task's lease, so that a report it stored
    is still known to be its own to upload once the lease is gone."""
    return f"fw:finished:{task_id}"


def node_key(nodename: str) -> str:
    """Which machine runs the Celery node `worker<N>@<hostname>`: two hosts with the same name would
    share every host-scoped key (and steal each other's leases), so the second one refuses to start."""
    return f"fw:node:{nodename}"
