"""The broker connection of the loop: the scan consumer (flow-controlled), the broadcast queues and the
pidbox, and the loop's wait. Only the loop thread touches it (kombu channels are not thread-safe).

The loop sleeps in poll(2) on the broker's socket and the Waker's pipe, for as long as its next timer
allows: a frame from the broker, a scan thread's end or a signal wakes it, and nothing else does. An idle
instance therefore wakes only for its timers and the AMQP heartbeats.

During a resource alarm RabbitMQ stops reading from a connection once it publishes (connection.blocked):
a message published then waits in the socket until the alarm clears, and so does the answer to our
connection.close. So a blocked connection is dropped without the close handshake, and a stop hands no
task back into it: the leases stay held, and this instance's restart or another instance requeues them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Callable
from typing import Any

import redis
from amqp import Message
from kombu import Connection, Consumer, Producer, Queue
from kombu.exceptions import OperationalError

from falcoria_worker import broker
from falcoria_worker.config import Settings

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = 0.01  # s to finish reading a message once its first bytes are in (the rest follows at once)
HEARTBEAT_CHECKS = 4  # AMQP heartbeat checks per negotiated interval (py-amqp needs two at least)


class Waker:
    """Wakes the loop out of its wait, from any thread or a signal handler: a byte on a pipe.
    Whoever wakes it makes its news visible first (a queue put, a flag), and the loop clears the pipe
    before it looks, so no news is ever left waiting for the next timer."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the loop is woken anyway
            os.write(self._write, b"\0")

    def observe(self, _transition: object) -> None:
        """After every transition: the loop's STATUS line and consumption follow the tasks."""
        self.wake()

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass

    def wait(self, timeout: float) -> None:
        """Sleep until woken or `timeout` (seconds) passed."""
        poller = select.poll()  # not select(): an instance with many files open has descriptors > 1023
        poller.register(self._read, select.POLLIN)
        poller.poll(max(0.0, timeout) * 1000)
        self.clear()


PROBE_LIMIT = 10.0  # s a stop waits to learn whether the broker takes a publish; unknown counts as blocked


class PublishersBlocked(Exception):
    """The broker blocks publishers (a memory or disk alarm): nothing can be handed back now."""


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
        self.blocked = False  # the broker told this connection it stopped reading (connection.blocked)

    def connect(
        self,
        on_scan: Callable[[Any], None],
        on_broadcast: Callable[[Any], None],
        control: dict[str, Callable[..., Any]],
    ) -> None:
        s = self.settings
        self.conn = self._open()
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

    @property
    def publishable(self) -> bool:
        """The loop's requeues wait while the broker blocks publishers: the leases stay ours till then."""
        return self.producer is not None and self.ok and not self.blocked

    def connect_to_publish(self) -> Producer:
        """A connection for the last requeues of a stop, when the loop's own is gone. Raises
        PublishersBlocked when the broker would not take the requeues now (see the module's text)."""
        if self.conn is None or self.producer is None:
            self.conn = self._open()
            self.producer = Producer(self.conn.channel())
            self.ok = True
        if self.blocked or not self._takes_a_publish(self.conn):
            raise PublishersBlocked("the broker blocks publishers (a resource alarm)")
        return self.producer

    def _open(self) -> Connection:
        self.blocked = False
        options = {"on_blocked": self._on_blocked, "on_unblocked": self._on_unblocked}
        return broker.connect(self.settings, transport_options=options)

    def _on_blocked(self, reason: str) -> None:
        log.warning("the broker blocks publishing: %s", reason)
        self.blocked = True

    def _on_unblocked(self) -> None:
        log.info("the broker takes publishes again")
        self.blocked = False

    def _takes_a_publish(self, conn: Connection) -> bool:
        """Before the leases are taken back for a requeue: a connection is blocked only once it publishes,
        so publish an unroutable message on a confirmed channel. The broker acks it at once, or blocks
        the connection and tells us so instead."""
        channel = conn.channel()
        acked: list[bool] = []
        channel.events["basic_ack"].add(lambda *_: acked.append(True))
        channel.confirm_select()
        channel.basic_publish(Message(b""), exchange="", routing_key=f"{self.nodename}.probe")
        deadline = time.monotonic() + PROBE_LIMIT
        while not acked and not self.blocked and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
        if acked and not self.blocked:
            channel.close()
            return True
        return False

    def drop(self) -> None:
        if self.conn is not None:
            # A dead connection may fail to close; it is gone either way. A blocked one never answers
            # the close: drop it without the handshake.
            with contextlib.suppress(Exception):
                if self.blocked:
                    self.conn.collect()
                else:
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

    def wait(self, timeout: float, waker: Waker) -> None:
        """Sleep until a frame arrives, the waker wakes or `timeout` (seconds) passed; handle the message
        that arrived (its callbacks run here) and keep the AMQP heartbeats going."""
        conn = self.conn
        if conn is None:
            waker.wait(timeout)
            return
        interval = conn.get_heartbeat_interval()
        if interval:
            timeout = min(timeout, interval / HEARTBEAT_CHECKS)
        sock = conn.connection.sock
        if sock is None:
            raise ConnectionError("the broker connection is closed")  # the loop reconnects
        # py-amqp reads exactly what it needs, so unread bytes stay in the kernel where poll sees them;
        # only TLS can hold a decrypted record in user space.
        pending = getattr(sock, "pending", None)
        readable = bool(pending and pending())
        if not readable:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(waker, select.POLLIN)
            events = dict(poller.poll(max(0.0, timeout) * 1000))
            if waker.fileno() in events:
                waker.clear()
            readable = sock.fileno() in events
        if readable:
            with contextlib.suppress(TimeoutError):  # a heartbeat frame, or a message not complete yet
                conn.drain_events(timeout=DRAIN_TIMEOUT)
        conn.heartbeat_check(rate=HEARTBEAT_CHECKS)

    def is_connection_error(self, exc: BaseException) -> bool:
        errors: tuple[type[BaseException], ...] = (OSError, redis.RedisError, OperationalError)
        if self.conn is not None:
            errors += tuple(self.conn.connection_errors) + tuple(self.conn.channel_errors)
        return isinstance(exc, errors)
