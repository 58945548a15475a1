"""The thread that delivers the spool's reports to ScanLedger, oldest first, exactly once per process.

See spool.py for the on-disk states an entry goes through; this module decides when to upload, how long to
back off, and when a report is ScanLedger's problem rather than an outage.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Literal

from falcoria_worker.errors import DeliveryRejected, Retryable
from falcoria_worker.ledger import LedgerUnavailable, ScanLedger
from falcoria_worker.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)


OnResult = Callable[[SpoolEntry, "str | None"], None]
# Whose a report is, asked right before its upload: "upload" (ours), "drop" (another instance owns the
# task now and delivers its own), "wait" (not known yet); raises Retryable while it cannot be known.
Verdict = Literal["upload", "drop", "wait"]
Confirm = Callable[[str], Verdict]


def _fields(entry: SpoolEntry) -> dict[str, str]:
    """Journal fields of a log record about one entry."""
    return {"TASK_ID": entry.task_id}


class Deliverer(threading.Thread):
    """Uploads pending entries oldest first; calls on_result(entry, None) after delivery (the entry is
    already removed then) or on_result(entry, reason) after ScanLedger refused it (moved to failed/).

    Waiting: when ScanLedger is unavailable (connection error, timeout, 429, 502-504) the pass stops and
    the whole spool backs off, capped exponentially with jitter, honouring Retry-After; `wake()` does not
    cut that short, so an outage never turns into a loop. Idle, it looks again every `rescan_every`
    seconds, which is how an entry the operator re-drove with `falcoria-worker spool retry` (another
    process) gets delivered. A 500 is ScanLedger's answer to a report its
    parser chokes on, so it backs off that entry alone and the pass goes on: one bad report must not hold
    the others back (which means a later report can overtake it). An entry that failed `give_up_after`
    times, while reports queued after its first failure were accepted, is this report's problem and not
    an outage: it moves to failed/ (kept there for the operator) instead of being retried forever. A
    ScanLedger that answers 500 to everything accepts nothing, so such an outage never fails an entry.

    Before each upload `confirm` says whose the report is (see docs/design.md, "Fencing"): a report of a
    task another instance took over is removed unsent (its owner's report is the one ScanLedger gets), one
    not yet known waits, and while Redis cannot tell, the whole spool backs off as in an outage.
    """

    def __init__(
        self,
        spool: Spool,
        ledger: ScanLedger,
        *,
        on_result: OnResult,
        confirm: Confirm = lambda _task_id: "upload",
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        give_up_after: int = 10,
        rescan_every: float = 30.0,
    ) -> None:
        super().__init__(name="spool-deliverer", daemon=True)
        self._spool = spool
        self._ledger = ledger
        self._on_result = on_result
        self._confirm = confirm
        self._initial = backoff_initial
        self._max = backoff_max
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._outages = 0  # consecutive passes cut short by an unavailable ScanLedger
        self._give_up_after = give_up_after
        self._rescan_every = rescan_every
        self._accepted = 0  # reports ScanLedger accepted so far (to tell a bad report from an outage)
        # entry -> (failures, monotonic due, self._accepted at its first failure)
        self._retry: dict[tuple[str, float], tuple[int, float, int]] = {}
        self._delivered: set[tuple[str, float]] = set()  # uploaded, removal pending: never upload again
        # What the spool is backing off for, until a pass gets through: the loop's STATUS says it.
        self.problem: str | None = None

    def use(self, ledger: ScanLedger, *, backoff_max: float) -> None:
        """A reloaded configuration: the next upload goes through `ledger` (one attribute each, read
        once per upload, so the upload in flight finishes with the old one)."""
        self._ledger = ledger
        self._max = backoff_max

    def wake(self) -> None:
        """A new entry is pending: deliver it now, unless the spool is backing off."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Stops after the upload in flight, if any (its outcome is recorded first). Every spool change
        is a single rename, so even a stop that times out leaves the spool consistent."""
        self._stopping.set()
        self._wake.set()
        if self.ident is None:
            return  # never started
        self.join(timeout)
        if self.is_alive():
            log.warning("spool: delivery still busy with an upload after %.0f s", timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # a wake() during the pass makes the idle wait below return at once
            try:
                wait, wakeable = self._pass()
            except Exception:
                log.exception("spool: delivery pass failed")
                self._outages += 1
                wait, wakeable = self._backoff(self._outages), False
            if wakeable:
                self._wake.wait(self._rescan_every if wait is None else min(wait, self._rescan_every))
            else:
                self._stopping.wait(wait)

    def _backoff(self, failures: int, retry_after: float | None = None) -> float:
        base = min(self._max, self._initial * 2 ** min(failures - 1, 32))
        delay = base / 2 + random.uniform(0, base / 2)  # noqa: S311 - jitter, not security
        if retry_after is not None:
            delay = max(delay, min(retry_after, self._max))
        return delay

    def _pass(self) -> tuple[float | None, bool]:
        """One sweep over the pending entries. Returns (seconds to wait or None for idle, wake-able)."""
        entries = self._spool.pending()
        waiting = False  # an entry whose owner is not known yet: look again soon
        keys = {(e.task_id, e.created) for e in entries}
        self._retry = {k: v for k, v in self._retry.items() if k in keys}
        self._delivered &= keys
        for entry in entries:
            if self._stopping.is_set():
                break
            key = (entry.task_id, entry.created)
            if key in self._delivered:
                self._finish(entry, key)  # the last removal failed; try again, never upload again
                continue
            if key in self._retry and self._retry[key][1] > time.monotonic():
                continue
            try:
                owner = self._confirm(entry.task_id)
            except Retryable as exc:
                return self._outage(exc, None, len(entries), "the lease of its task cannot be confirmed")
            if owner != "upload":
                waiting |= self._hold_back(entry, owner)
                continue
            try:
                ips = self._ledger.upload(entry.project, entry.mode, entry.track_history, entry.xml)
            except DeliveryRejected as exc:
                self._reject(entry, key, str(exc))
                continue
            except LedgerUnavailable as exc:
                if exc.status != 500:
                    return self._outage(exc, exc.retry_after, len(entries))
                self._entry_failed(entry, key, exc)
                continue
            except Retryable as exc:
                return self._outage(exc, None, len(entries))
            except Exception as exc:  # e.g. the report unreadable: this entry's problem, not the others'
                self._entry_failed(entry, key, exc)
                continue
            self._outages = 0
            self._accepted += 1
            self._retry.pop(key, None)
            self._delivered.add(key)
            log.info("spool: task %s delivered (%d IPs)", entry.task_id, len(ips), extra=_fields(entry))
            self._finish(entry, key)
        self._outages = 0
        self.problem = None
        due = [t for _, t, _ in self._retry.values()]
        if self._delivered or waiting:  # a removal to retry, or an owner to ask again
            due.append(time.monotonic() + self._backoff(1))
        return (max(0.0, min(due) - time.monotonic()) if due else None), True

    def _outage(
        self, exc: Exception, retry_after: float | None, pending: int, what: str = "ScanLedger unavailable"
    ) -> tuple[float, bool]:
        self._outages += 1
        wait = self._backoff(self._outages, retry_after)
        self.problem = f"{pending} report{'' if pending == 1 else 's'} spooled: {what}"
        log.warning("spool: %s (%s); %d pending, next try in %.1f s", what, exc, pending, wait)
        return wait, False

    def _hold_back(self, entry: SpoolEntry, owner: Verdict) -> bool:
        """Not uploaded now; True when it is to be asked about again soon. A dropped report reports no
        result: the task's status belongs to the instance that owns it now."""
        if owner == "wait":
            return True
        try:
            self._spool.done(entry)
        except OSError:
            log.exception(
                "spool: could not remove the report of task %s", entry.task_id, extra=_fields(entry)
            )
            return True
        log.warning(
            "spool: task %s dropped unsent: another instance owns the task (its lease was taken over)",
            entry.task_id,
            extra=_fields(entry),
        )
        return False

    def _entry_failed(self, entry: SpoolEntry, key: tuple[str, float], exc: Exception) -> None:
        failures, _due, accepted_then = self._retry.get(key, (0, 0.0, self._accepted))
        failures += 1
        if failures >= self._give_up_after and self._accepted > accepted_then:
            self._retry.pop(key, None)
            self._reject(
                entry, key, f"not accepted after {failures} attempts while other reports were ({exc})"
            )
            return
        wait = self._backoff(failures)
        self._retry[key] = (failures, time.monotonic() + wait, accepted_then)
        log.warning(
            "spool: task %s not delivered (%s: %s), attempt %d; retry in %.1f s",
            entry.task_id,
            type(exc).__name__,
            exc,
            failures,
            wait,
            extra=_fields(entry),
        )

    def _reject(self, entry: SpoolEntry, key: tuple[str, float], reason: str) -> None:
        try:
            self._spool.fail(entry, reason)
        except OSError as exc:
            # Still pending: the next try gets the same refusal (a refused import changes nothing).
            self._entry_failed(entry, key, exc)
            return
        log.error(
            "spool: task %s refused by ScanLedger: %s",
            entry.task_id,
            reason,
            extra=_fields(entry),
        )
        self._report(entry, reason)

    def _finish(self, entry: SpoolEntry, key: tuple[str, float]) -> None:
        try:
            self._spool.done(entry)
        except OSError:
            log.exception(
                "spool: task %s delivered but not removed; retrying the removal",
                entry.task_id,
                extra=_fields(entry),
            )
            return
        self._delivered.discard(key)
        self._report(entry, None)

    def _report(self, entry: SpoolEntry, reason: str | None) -> None:
        try:
            self._on_result(entry, reason)
        except Exception:
            log.exception("spool: on_result failed for task %s", entry.task_id, extra=_fields(entry))
