"""`systemctl reload falcoria-worker@N`: SIGHUP re-reads the configuration for the tasks that come next.

The signal handler only raises a flag; the loop takes it on its own thread between messages, so a reload
never races an admission. A running scan keeps the plan and engine it started with: a reload never stops
or hands back a scan. Settings that make up the instance or its connections (broker, Redis, identity,
state directory, pool size, credentials) take effect only at a restart: their new values are set aside and
named in a warning (never shown: some are secrets). systemd does not refresh the LoadCredential= copies on
reload either, so a new credential needs a restart anyway. A configuration that does not load leaves
everything as it was, and `problem` says why until a reload succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from falcoria_worker.config import KNOWN_KEYS, SECRET_KEYS, Settings
from falcoria_worker.delivery import Deliverer
from falcoria_worker.errors import ConfigError
from falcoria_worker.ledger import ScanLedger
from falcoria_worker.pipeline import Engine
from falcoria_worker.settings_io import LoadedSettings

log = logging.getLogger(__name__)

RESTART_KEYS: frozenset[str] = frozenset(
    {
        *SECRET_KEYS,
        *(k for k in KNOWN_KEYS if k.startswith(("RABBITMQ_", "REDIS_"))),
        "EXCHANGE_NAME",
        "EXCHANGE_TYPE",
        "NMAP_SCAN_QUEUE_NAME",
        "NMAP_SCAN_ROUTING_KEY",
        "NMAP_CANCEL_QUEUE_NAME",
        "WORKER_SERVICE_BROADCAST_QUEUE",
        "INSTANCE",
        "HOSTNAME",
        "SOURCE_ADDRESS",  # it decides the worker's name (config.worker_name())
        "NODE_NAME",
        "STATE_DIR",
        "CONCURRENCY",  # the size of the scan thread pool
        "LEASE_TTL",  # other instances judge this one's leases by it
        "STATUS_TTL",
        "LOGGER_LEVEL",
    }
)


@dataclass(frozen=True)
class Reloaded:
    settings: Settings
    engine: Engine


def held_back(current: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """`new` with the running values of the settings only a restart may change, and their names."""
    kept = [k for k in sorted(RESTART_KEYS) if getattr(current, k.lower()) != getattr(new, k.lower())]
    # The spool and its deliverer exist only when ScanLedger is configured.
    if (current.backend_base_url is None) != (new.backend_base_url is None):
        kept.append("BACKEND_BASE_URL")
    return replace(new, **{k.lower(): getattr(current, k.lower()) for k in kept}), kept


def changed_keys(old: Settings, new: Settings) -> list[str]:
    return [k for k in KNOWN_KEYS if getattr(old, k.lower()) != getattr(new, k.lower())]


class Reloader:
    def __init__(
        self,
        load: Callable[[], LoadedSettings],
        build_engine: Callable[[Settings], Engine],
        *,
        build_ledger: Callable[[Settings], ScanLedger] | None = None,
        deliverer: Deliverer | None = None,
    ) -> None:
        self._load = load  # the same layers the instance started with
        self._build_engine = build_engine
        self._build_ledger = build_ledger
        self._deliverer = deliverer
        self._requested = False
        self.problem: str | None = None  # why the last reload was refused, until one succeeds
        self.wake: Callable[[], None] = lambda: None  # the loop's waker: a reload must not wait for a timer

    def request(self, _signum: int = 0, _frame: object = None) -> None:
        """The SIGHUP handler: a flag and a byte on the loop's pipe, as a signal handler may run between
        any two bytecodes."""
        self._requested = True
        self.wake()

    def take(self, current: Settings) -> Reloaded | None:
        """The settings and engine for new tasks, when a reload was asked for and the new files load."""
        if not self._requested:
            return None
        self._requested = False
        log.info("reloading the configuration")
        try:
            loaded = self._load()
            new, kept = held_back(current, loaded.settings)
            engine = self._build_engine(new)
            ledger = self._build_ledger(new) if self._build_ledger and new.backend_base_url else None
        except ConfigError as exc:
            self.problem = f"reload refused: {exc}"
            log.error("configuration not reloaded, the previous one stays in force: %s", exc)
            return None
        for warning in loaded.warnings:
            log.warning("%s", warning)
        if kept:
            log.warning(
                "%s changed but take effect only at a restart (systemctl restart falcoria-worker@%s); "
                "the running values stay",
                ", ".join(kept),
                current.instance,
            )
        if self._deliverer is not None and ledger is not None:
            self._deliverer.use(ledger, backoff_max=new.upload_backoff_max)
        self.problem = None
        changed = changed_keys(current, new)
        log.info("configuration reloaded; %s", f"changed: {', '.join(changed)}" if changed else "no change")
        return Reloaded(new, engine)

    def poll(self, worker: Any) -> None:
        """On the loop thread: a requested reload, handed to every part of the run loop's `worker` that
        reads its settings per task. Running scans keep the plan and engine they started with."""
        reloaded = self.take(worker.settings)
        if reloaded is not None:
            holders = (worker, worker.admission, worker.scans, worker.control, worker.leases, worker.requeues)
            apply(reloaded, holders)


def apply(reloaded: Reloaded, holders: Iterable[object]) -> None:
    """Hands the new settings (and engine) to every part that reads them per task."""
    for holder in holders:
        if hasattr(holder, "settings"):
            holder.settings = reloaded.settings  # type: ignore[attr-defined]
        if hasattr(holder, "engine"):
            holder.engine = reloaded.engine  # type: ignore[attr-defined]
