"""TCP listeners that scan targets can run: `python -m tests.support.listeners --port P --banner B`.

A SYN scan resets half-open connections and -sV probes hang up mid-exchange; a listener whose handler
let that OSError escape would lose the port (it flaps to "closed"). Every per-connection error is
swallowed here, and the accept loop of socketserver already survives failed accepts.

With --hold FILE the listener holds a service scan for as long as FILE exists: connections get no
banner and are kept open (nmap -sV waits out every probe in turn), and once the test removes FILE
every connection is closed at once, so the scan finishes within moments ("tcpwrapped").
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import threading
from pathlib import Path

READ_TIMEOUT = 10.0  # a client that sends nothing is dropped after this long
HOLD_POLL = 0.05  # s: how soon a held connection sees its release


class _BannerHandler(socketserver.BaseRequestHandler):
    server: BannerServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        if self.server.peers is not None:
            with self.server.peers_lock, self.server.peers.open("a") as out:
                out.write(f"{self.client_address[0]}\n")
        if self.server.hold is not None:
            self._hold(sock)
            return
        try:
            sock.settimeout(READ_TIMEOUT)
            if self.server.banner:
                sock.sendall(self.server.banner)
            # Read (and ignore) until the client hangs up, like a server waiting for a command.
            while sock.recv(4096):
                pass
        except OSError:
            pass

    def _hold(self, sock: socket.socket) -> None:
        hold = self.server.hold
        assert hold is not None
        try:
            sock.settimeout(HOLD_POLL)
            while hold.exists():
                try:
                    if not sock.recv(4096):
                        return  # the client gave up on this probe
                except TimeoutError:
                    pass
        except OSError:
            pass
        # Released: the handler returns and the connection closes without a byte, which ends the probe.


class BannerServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 4096  # a connect scan opens connections faster than one accept thread drains

    def __init__(
        self, host: str, port: int, banner: bytes, peers: Path | None = None, hold: Path | None = None
    ) -> None:
        self.banner = banner
        self.peers = peers  # file that gets each connection's source address, one a line
        self.peers_lock = threading.Lock()
        self.hold = hold
        super().__init__((host, port), _BannerHandler)

    def handle_error(self, request: object, client_address: object) -> None:
        """Resets are the normal case under a scan: no traceback per connection."""


def serve_in_thread(host: str, port: int, banner: bytes = b"") -> BannerServer:
    """Start a listener in this process (e.g. on a loopback alias such as 127.0.0.5); call shutdown()
    and server_close() on the result to stop it."""
    server = BannerServer(host, port, banner)
    threading.Thread(target=server.serve_forever, name=f"listener-{host}:{port}", daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--banner", default="", help="sent on connect, followed by CRLF")
    parser.add_argument("--peers", type=Path, help="append each connection's source address to this file")
    parser.add_argument("--hold", type=Path, help="hold every connection silent while this file exists")
    args = parser.parse_args()
    banner = (args.banner + "\r\n").encode() if args.banner else b""
    with BannerServer(args.host, args.port, banner, args.peers, args.hold) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
