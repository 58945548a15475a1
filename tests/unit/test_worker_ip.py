"""worker_ip.py: /proc route parsing on captured text, the UDP-connect source lookup, and the echo URL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests

from falcoria_worker.worker_ip import default_gateway_v4, default_gateway_v6, default_route_source_ip, echo_ip

# Captured on a Debian 12 VM: `default via 192.0.2.1 dev eth0`, `192.0.2.0/24 dev eth0 src 192.0.2.2`.
ROUTE_V4 = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
# Same VM: `default via fd00::1 dev eth0 metric 1024`, plus the kernel's unreachable default on lo.
ROUTE_V6 = """\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""  # noqa: E501 - kernel text, kept verbatim
HEADER_V4 = ROUTE_V4.splitlines()[0]


def test_captured_ipv4_default_gateway() -> None:
    assert default_gateway_v4(ROUTE_V4) == "192.0.2.1"


def test_captured_ipv6_default_gateway_skips_the_unreachable_lo_route() -> None:
    assert default_gateway_v6(ROUTE_V6) == "fd00::1"


def test_lowest_metric_wins_and_down_or_reject_routes_are_skipped() -> None:
    text = "\n".join(
        [
            HEADER_V4,
            "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0",  # 192.168.1.1 metric 600
            "eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0",  # 10.0.0.1 metric 100
            "eth1\t00000000\t0200000A\t0002\t0\t0\t1\t00000000\t0\t0\t0",  # not RTF_UP
            "eth2\t00000000\t0300000A\t0203\t0\t0\t0\t00000000\t0\t0\t0",  # RTF_REJECT
            "garbage line",
            "eth3\tzzzzzzzz\t0300000A\t0003\t0\t0\t0\t00000000\t0\t0\t0",
        ]
    )
    assert default_gateway_v4(text) == "10.0.0.1"


def test_no_default_route() -> None:
    assert default_gateway_v4(HEADER_V4 + "\n" + ROUTE_V4.splitlines()[2]) is None
    assert default_gateway_v4("") is None
    assert default_gateway_v6(ROUTE_V6.splitlines()[0]) is None


def test_on_link_default_route_has_no_gateway() -> None:
    text = HEADER_V4 + "\nppp0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"
    assert default_gateway_v4(text) == "0.0.0.0"


def test_source_address_is_the_kernels_choice_for_the_gateway(tmp_path: Path) -> None:
    # Gateway 127.0.0.1 (0100007F): the kernel routes it over lo, so the source is 127.0.0.1.
    v4 = tmp_path / "route"
    v4.write_text(HEADER_V4 + "\nlo\t00000000\t0100007F\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert default_route_source_ip(v4, tmp_path / "missing") == "127.0.0.1"


def test_ipv6_is_the_fallback(tmp_path: Path) -> None:
    v4 = tmp_path / "route"
    v4.write_text(HEADER_V4 + "\n")
    v6 = tmp_path / "ipv6_route"
    v6.write_text(
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "00000000000000000000000000000001 00000400 00000002 00000000 00000003 lo\n"
    )
    assert default_route_source_ip(v4, v6) == "::1"


def test_no_route_files_means_no_address(tmp_path: Path) -> None:
    assert default_route_source_ip(tmp_path / "a", tmp_path / "b") is None


class _Echo(BaseHTTPRequestHandler):
    reply = b"203.0.113.7\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.reply)

    def log_message(self, *_args: object) -> None:
        """Silence the per-request stderr line."""


@pytest.fixture
def echo_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: HTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"


def test_echo_ip_reads_one_address(echo_server: HTTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    assert echo_ip(_url(echo_server), timeout=5) == "203.0.113.7"
    monkeypatch.setattr(_Echo, "reply", b"2001:DB8:0:0::1")
    assert echo_ip(_url(echo_server), timeout=5) == "2001:db8::1"


@pytest.mark.parametrize("reply", [b"<html>hello</html>", b"1.2.3.4 5.6.7.8", b"", b"9" * 10_000])
def test_echo_ip_refuses_anything_but_an_address(
    echo_server: HTTPServer, monkeypatch: pytest.MonkeyPatch, reply: bytes
) -> None:
    monkeypatch.setattr(_Echo, "reply", reply)
    with pytest.raises(ValueError):
        echo_ip(_url(echo_server), timeout=5)


def test_echo_ip_only_speaks_http() -> None:
    with pytest.raises(ValueError, match="http"):
        echo_ip("file:///etc/passwd", timeout=5)


def test_echo_ip_http_error(echo_server: HTTPServer) -> None:
    echo_server.RequestHandlerClass = BaseHTTPRequestHandler  # answers 501 to GET
    with pytest.raises(requests.HTTPError):
        echo_ip(_url(echo_server), timeout=5)
