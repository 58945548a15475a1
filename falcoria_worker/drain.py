"""`falcoria-worker drain [--wait]`: stop an instance taking new scans while its running scans finish.

The same thing as `celery control cancel_consumer nmap_scan_queue -d <node>` (and `add_consumer` to
resume), sent with Celery's control client over the instance's own broker settings; `--wait` then asks
the instance's stats until no scan is left, so an upgrade can follow.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from falcoria_worker.config import Settings, broker_url

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 5.0
POLL_INTERVAL = 5.0


def node_name(settings: Settings) -> str:
    return f"{settings.node_name}@{settings.hostname}"


def _ask(settings: Settings, command: str, **arguments: Any) -> Any:
    """The instance's reply, or None when it does not answer (not running, or no broker)."""
    node = node_name(settings)
    # Celery's control client publishes through its app's producer pool, so the app gets the broker.
    app = Celery("falcoria-worker", set_as_current=False, broker=broker_url(settings))
    app.conf.broker_connection_timeout = REPLY_TIMEOUT
    if settings.rabbitmq_ssl:
        app.conf.broker_use_ssl = ssl.create_default_context()
    try:
        replies = app.control.broadcast(
            command, arguments=arguments, destination=[node], reply=True, timeout=REPLY_TIMEOUT
        )
    except OperationalError as exc:
        log.warning("RabbitMQ unreachable: %s", exc)
        return None
    finally:
        app.close()
    for reply in replies or []:
        if node in reply:
            return reply[node]
    return None


def scans_left(settings: Settings) -> int | None:
    stats = _ask(settings, "stats")
    return stats.get("scans_left") if isinstance(stats, dict) else None


def drain(
    settings: Settings,
    *,
    wait: bool = False,
    timeout: float | None = None,
    say: Callable[[str], None] = print,
    poll: float = POLL_INTERVAL,
) -> int:
    """0: drained (with `wait`: and no scan left); 1: the instance did not answer or refused;
    3: scans still running at `timeout`."""
    reply = _ask(settings, "cancel_consumer", queue=settings.nmap_scan_queue_name)
    if not isinstance(reply, dict) or "ok" not in reply:
        say(f"{node_name(settings)} did not drain: {reply.get('error') if reply else 'no reply'}")
        return 1
    say(f"{node_name(settings)}: {reply['ok']}")
    if not wait:
        return 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = scans_left(settings)
        if left == 0:
            say(f"{node_name(settings)}: drained, no scan left")
            return 0
        if deadline is not None and time.monotonic() >= deadline:
            say(f"{node_name(settings)}: {left} scan(s) still running after {timeout:.0f} s")
            return 3
        if left is not None:
            say(f"{node_name(settings)}: draining: {left} scan{'' if left == 1 else 's'} left")
        time.sleep(poll)


def resume(settings: Settings, *, say: Callable[[str], None] = print) -> int:
    reply = _ask(settings, "add_consumer", queue=settings.nmap_scan_queue_name)
    if not isinstance(reply, dict) or "ok" not in reply:
        say(f"{node_name(settings)} did not resume: {reply.get('error') if reply else 'no reply'}")
        return 1
    say(f"{node_name(settings)}: {reply['ok']}")
    return 0
