"""The AMQP side of the worker, declared exactly as Tasker and the upstream worker declare it.

- Tasker's scan queue: `nmap_scan_queue`, durable, no arguments, bound to the topic exchange
  `nmap_exchange` with `nmap.scan`. Any difference (a queue type, a TTL, a dead-letter exchange) makes
  Tasker's own declare fail with 406 PRECONDITION_FAILED (contract §1.3).
- The two broadcasts are fanout exchanges (durable, not auto-delete) that Tasker never declares; each
  consumer binds a private auto-delete `bcast.<uuid>` queue, as kombu's Broadcast does.
- The Celery pidbox (`celery.pidbox`), so Tasker's `inspect().ping()` and `control.revoke()` reach us.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from kombu import Connection, Exchange, Producer, Queue
from kombu.common import Broadcast
from kombu.pidbox import Mailbox

from falcoria_worker.config import Settings, broker_url
from falcoria_worker.protocol import Delivery

log = logging.getLogger(__name__)

# The routing key Celery uses for broadcasts; fanout exchanges ignore it, but it is what Tasker sends.
BROADCAST_ROUTING_KEY = "celery"
# Bounded retries: a publish must not hang a stop that systemd is timing.
PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def tls_options(settings: Settings) -> dict[str, object] | bool:
    """kombu's `ssl=` argument: False for plain AMQP, else the options py-amqp wraps its socket with.

    py-amqp ignores an SSLContext passed here (it only reads a dict), and checks the host name only when
    it is given `server_hostname`: without it a certificate issued to any other host would pass."""
    if not settings.rabbitmq_ssl:
        return False
    options: dict[str, object] = {
        "server_hostname": settings.rabbitmq_host,
        "cert_reqs": ssl.CERT_REQUIRED,
    }
    if settings.rabbitmq_ssl_certfile:
        options["certfile"] = str(settings.rabbitmq_ssl_certfile)
        if settings.rabbitmq_ssl_keyfile:
            options["keyfile"] = str(settings.rabbitmq_ssl_keyfile)
    return options


def connect(
    settings: Settings, *, heartbeat: int = 30, transport_options: dict[str, Any] | None = None
) -> Connection:
    """A connected broker connection; raises kombu's OperationalError when the broker is unreachable.
    `transport_options` go to py-amqp's Connection (e.g. on_blocked/on_unblocked)."""
    # amqps: certificate and host name verified against the system's CAs ($SSL_CERT_FILE if set).
    conn = Connection(
        broker_url(settings),
        heartbeat=heartbeat,
        connect_timeout=5,
        ssl=tls_options(settings),
        transport_options=transport_options,
    )
    conn.ensure_connection(max_retries=1)
    return conn


def scan_queue(settings: Settings) -> Queue:
    exchange = Exchange(settings.exchange_name, type=settings.exchange_type, durable=True)
    return Queue(
        settings.nmap_scan_queue_name,
        exchange=exchange,
        routing_key=settings.nmap_scan_routing_key,
        durable=True,
    )


def broadcast_queue(exchange_name: str) -> Queue:
    # kombu's Broadcast, as Tasker's Celery and a stock worker declare it (and as `inspect active_queues`
    # shows it): a private auto-delete bcast.<uuid> queue on a durable fanout exchange.
    exchange = Exchange(exchange_name, type="fanout", durable=True, auto_delete=False)
    return Broadcast(
        exchange_name,
        queue=f"bcast.{uuid.uuid4()}",
        exchange=exchange,
        routing_key=BROADCAST_ROUTING_KEY,
    )


def listen_control(
    conn: Connection, channel: Any, nodename: str, handlers: Mapping[str, Callable[..., Any]]
) -> None:
    """Answer Celery remote control on `<nodename>.celery.pidbox`, with Celery's own mailbox settings
    (so the exchange declarations match every Celery client's)."""
    mailbox = Mailbox(
        "celery",
        type="fanout",
        accept=["json"],
        queue_ttl=300.0,
        reply_queue_ttl=300.0,
        queue_expires=10.0,
        reply_queue_expires=10.0,
    )(conn)
    node = mailbox.Node(hostname=nodename, state=None, channel=channel, handlers=dict(handlers))

    def handle(body: object, message: Any) -> None:
        # Anyone on the broker can publish to the pidbox fanout; a malformed control message (not a
        # dict, no method, an odd clock header) must not reach drain_events as an exception, or every
        # instance of the fleet would exit at once.
        try:
            node.handle_message(body, message)
        except Exception:
            log.exception("ignored a malformed control message")

    node.listen(channel=channel, callback=handle)


def publish_scan(producer: Producer, settings: Settings, raw: Delivery) -> None:
    """Put a scan message back on Tasker's queue byte for byte: same body, headers and task id."""
    props = raw.properties
    queue = scan_queue(settings)
    producer.publish(
        raw.body.encode("utf-8"),
        exchange=queue.exchange,
        routing_key=settings.nmap_scan_routing_key,
        headers=raw.headers,
        content_type=props.get("content_type") or "application/json",
        content_encoding=props.get("content_encoding") or "utf-8",
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        priority=props.get("priority") or 0,
        delivery_mode=2,
        declare=[queue],
        retry=True,
        retry_policy=PUBLISH_RETRY,
    )
