"""The worker's exception tree. Every ack, retry and status decision depends on which branch an error is on.

WorkerError
├── Rejected            permanent: the task or its options are bad; never retried, nmap never started
├── ConfigError         permanent: a setting is bad; start-up stops naming the key and the fix
├── ScanFailed          the scan itself failed (nmap could not start, exited non-zero, phase 1 timed out)
├── Cancelled           a cancel broadcast, a revoke or a shutdown stopped the task; nothing is uploaded
├── Retryable           transient: broker, Redis or ScanLedger unavailable; try again later
│   └── ScanInterrupted nmap killed by someone else; DiskFull: STATE_DIR's filesystem is full
└── DeliveryRejected    permanent: ScanLedger refused the report (4xx other than 429)
"""

from __future__ import annotations

import errno


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""


class Rejected(WorkerError):
    """Bad input from the queue or the command line. `reason` is safe to log and to store in Redis."""

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class ConfigError(WorkerError):
    """A setting that cannot work. The message names the key and says how to fix it."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"{key}: {problem}; {fix}")
        self.key = key
        self.problem = problem
        self.fix = fix


class ScanFailed(WorkerError):
    """nmap could not produce a usable result."""


class Cancelled(WorkerError):
    """The task was cancelled (broadcast, revoke, missing Tasker metadata or worker shutdown)."""


class Retryable(WorkerError):
    """A transient failure of a peer (RabbitMQ, Redis, ScanLedger)."""


class ScanInterrupted(Retryable):
    """nmap died of a signal the worker did not send: not the task's fault, so it runs again."""


class DiskFull(ScanInterrupted):
    """The state directory's filesystem is full: not the task's fault, so it is handed back whole (no
    half-written report is kept or sent) and runs again once there is space."""

    def __init__(self, where: object) -> None:
        super().__init__(f"no space left on the disk of {where} (STATE_DIR); handed back until it has room")


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DeliveryRejected(WorkerError):
    """ScanLedger refused the report for good (401, 404, 413, 422, ...)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"ScanLedger answered {status}: {detail}")
        self.status = status
        self.detail = detail


def describe(exc: BaseException) -> str:
    """One short line for a log record or a STATUS text: a peer's error can be long and multi-line."""
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
