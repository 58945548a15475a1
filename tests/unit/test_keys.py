"""keys.py spells every Tasker key exactly as contract §3 (falcoria-common's RedisKeyBuilder) does."""

from __future__ import annotations

from falcoria_worker import keys

P = "a2783030-5c1e-4f0b-9d36-2f4a8e1b7c90"
U = "8ce86274-1b2d-4c3e-8f4a-5b6c7d8e9f01"
T = "5f0c5a8e-2b7d-4d8a-9a51-0f3c2e1d4b6a"


def test_tasker_keys() -> None:
    assert keys.project_tasks_key(P) == f"project:{P}:task_ids"
    assert keys.user_tasks_key(U) == f"user:{U}:task_ids"
    assert keys.project_ip_tasks_key(P, "93.184.216.34") == f"project:{P}:ip:93.184.216.34:task_ids"
    assert keys.metadata_key(T) == f"task:{T}:metadata:nmap"
    assert keys.running_task_key(T, "scanner-1") == f"running:task:{T}:host:scanner-1"
    assert keys.worker_key("scanner-1") == "worker:scanner-1"


def test_lock_key_keeps_open_ports_str_verbatim() -> None:
    # Tasker joins the ports with spaces; the key must carry them unchanged or cleanup misses the lock.
    assert keys.lock_key(P, "1.2.3.4", "80 443 8080 1000-2000") == (
        f"lock:project:{P}:ip:1.2.3.4:ports:80 443 8080 1000-2000"
    )
    assert keys.lock_key(P, "1.2.3.4", "1-65535") == f"lock:project:{P}:ip:1.2.3.4:ports:1-65535"
    # Tasker's "already in queue" scan takes the IP as the 5th ':' field.
    assert keys.lock_key(P, "1.2.3.4", "22").split(":")[4] == "1.2.3.4"


def test_both_pid_hash_names() -> None:
    # Written (and read by upstream cancel) under one name, HDELed by upstream cleanup under the other.
    assert keys.pid_hash_key("h") == "running_tool:nmap:h"
    assert keys.legacy_pid_hash_key("h") == "running:tool:nmap:host:h"


def test_legacy_keys() -> None:
    assert keys.legacy_ip_task_lock_key(P, "1.2.3.4") == f"project:{P}:ip_task_lock:1.2.3.4"
    assert keys.legacy_scan_lock_key("h") == "scan:lock:h"


def test_extension_keys_stay_out_of_taskers_patterns() -> None:
    assert keys.status_key(T) == f"task:{T}:status"
    assert keys.lease_key(T) == f"fw:lease:{T}"
    assert keys.LEASES_KEY == "fw:leases"
    assert keys.revoked_key(T) == f"fw:revoked:{T}"
    assert keys.delivered_key(T) == f"fw:delivered:{T}"
    ours = [
        keys.status_key(T),
        keys.lease_key(T),
        keys.LEASES_KEY,
        keys.revoked_key(T),
        keys.delivered_key(T),
    ]
    for key in ours:
        # Tasker SCANs running:task:*:host:*, lock:project:*, and KEYS worker:*; none may match ours.
        assert not key.startswith(("running:", "lock:", "worker:", "project:", "user:"))
        assert not key.endswith(":metadata:nmap")
