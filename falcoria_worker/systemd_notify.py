"""systemd notifications for the Type=notify unit: READY, STATUS, WATCHDOG, STOPPING.

Outside systemd (a terminal, a test) there is no NOTIFY_SOCKET and every call is a no-op that returns False.
No call ever raises: a lost notification must not take a scan down with it (systemd's watchdog notices a
worker that really stopped pinging).
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


class Notifier:
    """Thread-safe; each method returns whether a datagram was sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_status: str | None = None
        self._failed_before = False
        self._last_watchdog = 0.0  # monotonic

    def ready(self, status: str | None = None) -> bool:
        return self._send("READY=1", status)

    def status(self, text: str) -> bool:
        """STATUS= for `systemctl status`; a repeat of the current text is not sent again."""
        with self._lock:
            if _one_line(text) == self._last_status:
                return False
        return self._send(None, text)

    def watchdog(self) -> bool:
        return self._send("WATCHDOG=1", None)

    def watchdog_due(self) -> float | None:
        """When the next WATCHDOG=1 is due (monotonic), or None without a watchdog."""
        interval = self.watchdog_interval()
        return None if interval is None else self._last_watchdog + interval

    def feed_watchdog(self, now: float) -> None:
        """WATCHDOG=1 when it is due. The caller is the loop itself: a hung loop (deadlock, SIGSTOP)
        stops the pings, and systemd restarts the instance."""
        due = self.watchdog_due()
        if due is not None and now >= due:
            self._last_watchdog = now
            self.watchdog()

    def stopping(self, status: str | None = None) -> bool:
        return self._send("STOPPING=1", status)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec=, as sd_watchdog_enabled(3) advises.

        None when the unit has no watchdog or the watchdog is meant for another process (WATCHDOG_PID).
        """
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and pid != str(os.getpid()):
            return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def _send(self, state: str | None, status: str | None) -> bool:
        if not os.environ.get("NOTIFY_SOCKET"):
            return False
        lines = [state] if state else []
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        with self._lock:
            try:
                from systemd import daemon

                sent = bool(daemon.notify("\n".join(lines)))
            except Exception as exc:  # OSError from the socket, or a broken systemd module
                self._report_failure(exc)
                return False
            if sent and status is not None:
                self._last_status = _one_line(status)
            return sent

    def _report_failure(self, exc: Exception) -> None:
        # Once loudly, then quietly: the watchdog pings every few seconds.
        level = logging.DEBUG if self._failed_before else logging.WARNING
        self._failed_before = True
        log.log(level, "sd_notify failed: %s", exc)


def _one_line(text: str) -> str:
    # A newline would start another assignment in the datagram (STATUS=x\nREADY=1).
    return " ".join(text.splitlines())
