"""The broker connection of the loop: the scan consumer (flow-controlled), the broadcast queues and the
pidbox. Only the loop thread touches it (kombu channels are not thread-safe)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis
from kombu import Connection, Consumer, Producer, Queue
from kombu.exceptions import OperationalError

from falcoria_worker import broker
from falcoria_worker.config import Settings

log = logging.getLogger(__name__)


class BrokerLink:
    def __init__(self, settings: Settings, nodename: str) -> None:
        self.settings = settings
        self.nodename = nodename
        self.ok = False
        self.conn: Connection | None = None
        self.producer: Producer | None = None
        self.scan_consumer: Consumer | None = None
        self.broadcasts: list[Queue] = []  # as declared, for `inspect active_queues`
        self.consuming = False

    def connect(
        self,
        on_scan: Callable[[Any], None],
        on_broadcast: Callable[[Any], None],
        control: dict[str, Callable[..., Any]],
    ) -> None:
        s = self.settings
        self.conn = broker.connect(s)
        channel = self.conn.channel()
        self.scan_consumer = Consumer(
            channel, queues=[broker.scan_queue(s)], on_message=on_scan, no_ack=False, prefetch_count=1
        )
        self.scan_consumer.declare()
        # Tasker never declares the fanout exchanges; its first broadcast fails unless a worker has.
        names = (s.nmap_cancel_queue_name, s.worker_service_broadcast_queue)
        self.broadcasts = [broker.broadcast_queue(name) for name in names]
        Consumer(channel, queues=self.broadcasts, on_message=on_broadcast, no_ack=True).consume()
        broker.listen_control(self.conn, channel, self.nodename, control)
        self.producer = Producer(channel)
        self.ok = True
        self.consuming = False
        log.info("consuming %s as %s", s.nmap_scan_queue_name, self.nodename)

    def connect_to_publish(self) -> Producer:
        """A connection for the last requeues of a stop, when the loop's own is gone."""
        if self.conn is None or self.producer is None:
            self.conn = broker.connect(self.settings)
            self.producer = Producer(self.conn.channel())
            self.ok = True
        return self.producer

    def drop(self) -> None:
        if self.conn is not None:
            # A dead connection may fail to close; it is gone either way.
            with contextlib.suppress(Exception):
                self.conn.release()
        self.conn = None
        self.producer = None
        self.scan_consumer = None
        self.consuming = False

    def lost(self) -> None:
        self.ok = False
        self.consuming = False

    def consume(self, want: bool) -> bool | None:
        """Consume scans or stop; returns the new setting when it changed."""
        if self.scan_consumer is None:
            return None
        if want and not self.consuming:
            self.scan_consumer.consume()
            self.consuming = True
            return True
        if not want and self.consuming:
            self.scan_consumer.cancel()
            self.consuming = False
            return False
        return None

    def is_connection_error(self, exc: BaseException) -> bool:
        errors: tuple[type[BaseException], ...] = (OSError, redis.RedisError, OperationalError)
        if self.conn is not None:
            errors += tuple(self.conn.connection_errors) + tuple(self.conn.channel_errors)
        return isinstance(exc, errors)
