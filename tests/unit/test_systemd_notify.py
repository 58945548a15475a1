"""service.py against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from falcoria_worker.systemd_notify import Notifier


class NotifySocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def datagrams(self) -> list[bytes]:
        # Notifications are sent synchronously, so everything is queued by now: read without waiting.
        received = []
        while True:
            try:
                received.append(self.sock.recv(4096))
            except BlockingIOError:
                return received


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="fw-notify-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield NotifySocket(sock)


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert notifier.ready("up") is False
    assert notifier.status("idle") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_exact_datagrams(notify_socket: NotifySocket) -> None:
    notifier = Notifier()
    assert notifier.ready("consuming nmap_scan_queue")
    assert notifier.watchdog()
    assert notifier.status("scanning 1/1")
    assert notifier.stopping("stopping: 1 scan to hand back")
    assert notify_socket.datagrams() == [
        b"READY=1\nSTATUS=consuming nmap_scan_queue",
        b"WATCHDOG=1",
        b"STATUS=scanning 1/1",
        b"STOPPING=1\nSTATUS=stopping: 1 scan to hand back",
    ]


def test_ready_and_stopping_without_status(notify_socket: NotifySocket) -> None:
    notifier = Notifier()
    notifier.ready()
    notifier.stopping()
    assert notify_socket.datagrams() == [b"READY=1", b"STOPPING=1"]


def test_repeated_status_is_sent_once(notify_socket: NotifySocket) -> None:
    notifier = Notifier()
    assert notifier.ready("idle")
    assert notifier.status("idle") is False
    assert notifier.status("scanning")
    assert notifier.status("scanning") is False
    assert notifier.status("idle")
    assert notify_socket.datagrams() == [b"READY=1\nSTATUS=idle", b"STATUS=scanning", b"STATUS=idle"]


def test_status_cannot_inject_other_assignments(notify_socket: NotifySocket) -> None:
    Notifier().status("failed\nREADY=1\nWATCHDOG=trigger")
    assert notify_socket.datagrams() == [b"STATUS=failed READY=1 WATCHDOG=trigger"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"falcoria-worker-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_a_dead_socket_never_raises(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/falcoria-worker/notify")
    notifier = Notifier()
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "sd_notify failed" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 30.0),
        ("5000000", "self", 2.5),
        ("60000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(
                name, {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            )
    assert Notifier().watchdog_interval() == expected


def test_feed_watchdog_pings_once_per_interval(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")  # pings due every 10 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    notifier.feed_watchdog(100.0)
    assert notifier.watchdog_due() == 110.0
    notifier.feed_watchdog(109.0)  # not due yet
    notifier.feed_watchdog(110.0)
    assert notify_socket.datagrams() == [b"WATCHDOG=1", b"WATCHDOG=1"]


def test_no_watchdog_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert Notifier().watchdog_due() is None
