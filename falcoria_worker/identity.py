"""Who this instance is: the node name Tasker and Celery see, the lease owner, and the machine behind it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from falcoria_worker.config import Settings
from falcoria_worker.errors import ConfigError


def machine_id() -> str:
    """systemd's machine id, or the boot id where there is none (a container without /etc/machine-id)."""
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        with contextlib.suppress(OSError):
            text = Path(path).read_text().strip()
            if text:
                return text
    return "unknown-machine"


@dataclass(frozen=True)
class Identity:
    nodename: str  # NODE_NAME@HOSTNAME, as Celery names workers
    owner: str  # lease owner: stable across restarts of the same instance
    machine: str  # the machine and the state dir, so a restart here is recognised as us

    @classmethod
    def of(cls, settings: Settings) -> Identity:
        nodename = f"{settings.node_name}@{settings.hostname}"
        return cls(nodename, nodename, f"{machine_id()}:{settings.state_dir}")


def lock_state_dir(state_dir: Path) -> int:
    """One `run` per state directory: a second one (the same instance started by hand beside the unit)
    would kill the first one's nmap as an orphan and take over its leases. The returned descriptor
    holds the lock until the process exits."""
    fd = os.open(state_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            "STATE_DIR",
            f"{state_dir} is in use by another falcoria-worker run (the same instance twice?)",
            "stop the other one, or give this one its own INSTANCE",
        ) from None
    return fd
