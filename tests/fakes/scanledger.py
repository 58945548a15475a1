"""A faithful fake of ScanLedger's report import (contract §5) for tests, benchmarks and system tests.

`check_report()` is ScanLedger's import parser reduced to its verdict: the IPs it would import, or the
status code it would answer. It follows scanledger:app/projects/parsers/new_custom_parser.py and
nmap_to_internal.py (every attribute read with `attrib[...]` or converted with `int()` is required) plus
the verified facts of contract §5.2a. The fake refuses everything the real server refuses, with the same
status code; it must never be more lenient, or our tests would pass against reports production rejects.

`FakeScanLedger` serves GET /health, GET /projects and POST /projects/{id}/ips/import on 127.0.0.1 (HTTP,
or HTTPS with `tls=`): bearer tokens checked by sha256 hash, admin vs member access, 401/404/413/422/500
as in §5.1-5.2.
It records accepted uploads and rejected requests, and injects faults: fail_next(), fail_for(), delay(),
refuse()/resume() (the listening socket closed, then reopened on the same port).
The `scanledger` pytest fixture yields a started fake with an admin `token` and a `project`.
Out of process (system tests, benchmarks):
    python -m tests.fakes.scanledger --host H --port N --token-file F --project UUID [--state-file S]
prints "listening on URL" and serves GET /_fake/uploads, GET /_fake/rejections and POST /_fake/fail
({"status", "count"} | {"status", "seconds"} | {"delay"} | {"refuse_seconds"} | {"clear"}).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import ipaddress
import json
import re
import secrets
import signal
import socket
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.etree.ElementTree import Element

import pytest

# falcoria_common.schemas.enums.port.PortState
PORT_STATES = frozenset({"open", "closed", "filtered", "unfiltered", "open|filtered", "closed|filtered"})
# falcoria_common.schemas.enums.port.ProtocolEnum: nmap_to_internal converts every port's protocol to it
PROTOCOLS = frozenset({"tcp", "udp"})
CANNOT_IMPORT = "Cannot import Report"


class ReportRejected(Exception):
    """ScanLedger would answer `status` to this report; `detail` says which rule refused it."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class _Missing(Exception):
    """A required part is absent or not convertible: ScanLedger raises KeyError/ValueError -> 500."""


def _attr(el: Element | None, name: str, where: str) -> str:
    if el is None:
        raise _Missing(f"<{where}> missing")
    value = el.get(name)
    if value is None:
        raise _Missing(f"{where}@{name} missing")
    return value


def _int(el: Element | None, name: str, where: str) -> int:
    value = _attr(el, name, where)
    try:
        return int(value)
    except ValueError:
        raise _Missing(f"{where}@{name}={value!r} is not an integer") from None


def _check_root(root: Element) -> None:
    for name in ("scanner", "args", "startstr", "version", "xmloutputversion"):
        _attr(root, name, "nmaprun")
    _int(root, "start", "nmaprun")
    scaninfo = root.find("scaninfo")  # only the first one is read
    for name in ("type", "protocol", "services"):
        _attr(scaninfo, name, "scaninfo")
    _int(scaninfo, "numservices", "scaninfo")
    _int(root.find("verbose"), "level", "verbose")
    _int(root.find("debugging"), "level", "debugging")
    progress = root.find("taskprogress")
    if progress is not None:
        _attr(progress, "task", "taskprogress")
        _int(progress, "time", "taskprogress")
        try:
            float(_attr(progress, "percent", "taskprogress"))
        except ValueError:
            raise _Missing("taskprogress@percent is not a number") from None
        for name in ("remaining", "etc"):
            if progress.get(name) is not None:
                _int(progress, name, "taskprogress")


def _check_script(script: Element) -> None:
    _attr(script, "id", "script")
    _attr(script, "output", "script")
    # Verified against the real server (contract §5.2a): an <elem> without key is a 500. Where inside the
    # script the real parser trips is not known, so every <elem> below the script counts (the stricter
    # reading; merge.py keys them all).
    for elem in script.iter("elem"):
        if elem.get("key") is None:
            raise _Missing(f"script {script.get('id')!r} has an <elem> without key")


def _check_port(port: Element) -> None:
    protocol = _attr(port, "protocol", "port")
    if protocol not in PROTOCOLS:
        raise _Missing(f"port@protocol={protocol!r} is not tcp/udp")
    _int(port, "portid", "port")
    state = port.find("state")
    value = _attr(state, "state", "port/state")
    if value not in PORT_STATES:
        raise _Missing(f"port/state@state={value!r} is not a PortState")
    _attr(state, "reason", "port/state")
    _int(state, "reason_ttl", "port/state")
    service = port.find("service")
    if service is not None:
        if service.get("conf") is not None:
            _int(service, "conf", "service")
        if any(cpe.text is None for cpe in service.findall("cpe")):
            raise _Missing("service/cpe without text")
    for script in port.findall("script"):
        _check_script(script)


def _check_os(os_el: Element) -> None:
    for used in os_el.findall("portused"):
        _attr(used, "state", "portused")
        _attr(used, "proto", "portused")
        _int(used, "portid", "portused")
    for match in os_el.findall("osmatch"):
        _attr(match, "name", "osmatch")
        _int(match, "accuracy", "osmatch")
        if match.get("line") is not None:
            _int(match, "line", "osmatch")
        for osclass in match.findall("osclass"):
            if osclass.get("accuracy") is not None:
                _int(osclass, "accuracy", "osclass")
            if any(cpe.text is None for cpe in osclass.findall("cpe")):
                raise _Missing("osclass/cpe without text")


def _check_host(host: Element) -> str:
    _int(host, "starttime", "host")
    _int(host, "endtime", "host")
    status = host.find("status")
    _attr(status, "state", "host/status")
    _attr(status, "reason", "host/status")
    _int(status, "reason_ttl", "host/status")
    address = host.find("address")  # only the first <address> is read
    addr = _attr(address, "addr", "host/address")
    _attr(address, "addrtype", "host/address")
    try:
        ip = ipaddress.ip_address(addr).compressed
    except ValueError:
        raise _Missing(f"host/address@addr={addr!r} is not an IP address") from None
    ports = host.find("ports")
    if ports is None:
        raise _Missing("<host> without <ports>")
    for port in ports.findall("port"):
        _check_port(port)
    for extra in ports.findall("extraports"):
        _attr(extra, "state", "extraports")
        _int(extra, "count", "extraports")
        for reason in extra.findall("extrareasons"):
            _attr(reason, "reason", "extrareasons")
            _int(reason, "count", "extrareasons")
    os_el = host.find("os")
    if os_el is not None:
        _check_os(os_el)
    uptime = host.find("uptime")
    if uptime is not None:
        _int(uptime, "seconds", "uptime")
        _attr(uptime, "lastboot", "uptime")
    return ip


def check_report(xml: bytes) -> list[str]:
    """The IPs ScanLedger's import would take from `xml` (deduplicated, in report order).

    Raises ReportRejected(400, ...) for an empty file or a report without <host>, and
    ReportRejected(500, ...) for anything ScanLedger's parser crashes on.
    """
    if not xml:
        raise ReportRejected(400, f"{CANNOT_IMPORT}: empty file")
    try:
        # ScanLedger decodes the upload to text before parsing it.
        root = ET.fromstring(xml.decode("utf-8"))  # noqa: S314 - the same parser ScanLedger uses; test input
    except (UnicodeDecodeError, ET.ParseError) as exc:
        raise ReportRejected(500, f"unparsable XML: {exc}") from None
    try:
        _check_root(root)
        ips = [_check_host(host) for host in root.findall("host")]
    except _Missing as exc:
        raise ReportRejected(500, str(exc)) from None
    if not ips:
        raise ReportRejected(400, f"{CANNOT_IMPORT}: no <host>")
    return list(dict.fromkeys(ips))


def sample_report(*ips: str, port_xml: str = "") -> bytes:
    """A small report ScanLedger accepts (default one host, 127.0.0.1): port 80 open on each host, with
    `port_xml` (a <script>, a <service>) inside it. Carriage returns and non-ASCII text are included so a
    test comparing bytes notices any re-encoding on the way."""
    hosts = "".join(
        f'<host starttime="1700000000" endtime="1700000005">'
        f'<status state="up" reason="user-set" reason_ttl="0"/>'
        f'<address addr="{ip}" addrtype="{"ipv6" if ":" in ip else "ipv4"}"/>'
        f'<hostnames><hostname name="caf\u00e9.example" type="user"/></hostnames>'
        f'<ports><port protocol="tcp" portid="80"><state state="open" reason="syn-ack" reason_ttl="64"/>'
        f"{port_xml}</port></ports></host>\r\n"
        for ip in ips or ("127.0.0.1",)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\r\n<!DOCTYPE nmaprun>\r\n'
        '<nmaprun scanner="nmap" args="nmap -p 80 target" start="1700000000" startstr="Tue Nov 14"'
        ' version="7.93" xmloutputversion="1.05">'
        '<scaninfo type="syn" protocol="tcp" numservices="1" services="80"/>'
        '<verbose level="0"/><debugging level="0"/>\r\n'
        f"{hosts}</nmaprun>\r\n"
    ).encode()


# ---------------------------------------------------------------------------------------------------------
# The HTTP server
# ---------------------------------------------------------------------------------------------------------

DEFAULT_MAX_UPLOAD = 500_000_000  # ScanLedger's max_file_upload_size
IMPORT_MODES = frozenset({"insert", "replace", "update", "append"})
# pydantic's str -> bool (FastAPI query parameters)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_IMPORT_PATH = re.compile(r"/projects/([^/]+)/ips/import")
_CONTROL = "/_fake/"


@dataclass(frozen=True)
class Upload:
    """An import ScanLedger accepted (200)."""

    project: str
    mode: str
    track_history: bool
    xml: bytes
    ips: list[str]
    time: float

    def as_json(self) -> dict[str, object]:
        return {
            "project": self.project,
            "mode": self.mode,
            "track_history": self.track_history,
            "ips": self.ips,
            "time": self.time,
            "size": len(self.xml),
            "sha256": hashlib.sha256(self.xml).hexdigest(),
            "xml_b64": base64.b64encode(self.xml).decode("ascii"),
        }


@dataclass(frozen=True)
class Rejection:
    """A request answered with anything but 2xx (injected faults included, reason "injected ...")."""

    status: int
    reason: str
    path: str
    time: float


@dataclass
class _User:
    admin: bool
    projects: set[str]
    expires_at: float | None


@dataclass
class _Fault:
    status: int
    remaining: int | None  # None: until `until`
    until: float | None
    retry_after: int | None


@dataclass(frozen=True)
class _Part:
    name: str | None
    filename: str | None
    data: bytes


class _BadBody(Exception):
    """Starlette could not parse the multipart body (400)."""


class _Answer(Exception):
    """Stops request handling with this response."""

    def __init__(
        self,
        status: int,
        detail: object,
        reason: str,
        *,
        plain: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.detail = detail
        self.reason = reason
        self.plain = plain  # FastAPI's unhandled-exception 500 is text/plain, not JSON
        self.headers = headers or {}


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _parse_multipart(body: bytes, content_type: str) -> list[_Part]:
    """multipart/form-data split by hand so the file part's bytes come back exactly as sent."""
    msg = Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise _BadBody("no boundary")
    segments = (b"\r\n" + body).split(b"\r\n--" + boundary.encode("latin-1"))
    if len(segments) < 2 or not segments[-1].startswith(b"--"):
        raise _BadBody("no closing boundary")
    parts = []
    for segment in segments[1:-1]:
        head, sep, data = segment.partition(b"\r\n\r\n")
        if not sep:
            raise _BadBody("part without header end")
        disposition = ""
        for line in head.split(b"\r\n")[1:]:  # [0] is the rest of the boundary line
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value.strip()
        headers = Message()
        headers["content-disposition"] = disposition
        field = headers.get_param("name", header="content-disposition")
        filename = headers.get_param("filename", header="content-disposition")
        parts.append(
            _Part(
                name=collapse_rfc2231_value(field) if field is not None else None,
                filename=collapse_rfc2231_value(filename) if filename is not None else None,
                data=data,
            )
        )
    return parts


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # resume() binds the same port while old connections sit in TIME_WAIT

    def __init__(self, address: tuple[str, int], fake: FakeScanLedger) -> None:
        self.fake = fake
        super().__init__(address, _Handler)
        if fake.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*fake.tls)
            # The handshake runs in the handler thread, so a client that never completes one cannot stall
            # the accept loop.
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn: refuse() must cut pooled connections too
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the fake records what matters in uploads/rejections."""

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()
        self.server.fake._track(self.connection, add=True)

    def finish(self) -> None:
        self.server.fake._track(self.connection, add=False)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        fake = self.server.fake
        try:
            if url.path.startswith(_CONTROL):
                status, payload = fake._control(method, url.path, body)
                self._send_json(status, payload)
                return
            fake._before_request()
            status, payload = fake._handle(method, url.path, parse_qs(url.query), self.headers, body)
            self._send_json(status, payload)
        except _Answer as answer:
            fake._reject(answer.status, answer.reason, url.path)
            if answer.plain:
                data, content_type = str(answer.detail).encode(), "text/plain; charset=utf-8"
            else:
                data, content_type = json.dumps({"detail": answer.detail}).encode(), "application/json"
            self._send(answer.status, data, content_type, answer.headers)

    def _send_json(self, status: int, payload: object) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


class FakeScanLedger:
    """ScanLedger's /health and report import on 127.0.0.1, with recording and fault injection.

    Tokens are kept as sha256 hex only, as ScanLedger stores them. `token` and `project` are the defaults
    the fixture and the command line set up, for the test's convenience.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_upload: int = DEFAULT_MAX_UPLOAD,
        state_file: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.host = host
        self.tls = tls  # (certificate chain, key): serve HTTPS, as ScanLedger does behind NGINX Unit
        self.port = port
        self.max_upload = max_upload
        self.state_file = state_file
        self.token: str | None = None
        self.project: str | None = None
        self._users: dict[str, _User] = {}
        self._projects: set[str] = set()
        self._uploads: list[Upload] = []
        self._rejections: list[Rejection] = []
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- set-up -------------------------------------------------------------------------------------

    def add_token(
        self,
        token: str | None = None,
        *,
        admin: bool = True,
        projects: tuple[str, ...] = (),
        expires_at: float | None = None,
    ) -> str:
        """Registers a user; returns its token (a fresh random one unless given)."""
        token = token or secrets.token_urlsafe(32)
        with self._changed:
            self._users[_token_hash(token)] = _User(admin, {str(uuid.UUID(p)) for p in projects}, expires_at)
        return token

    def add_project(self, project: str | None = None) -> str:
        project = str(uuid.UUID(project)) if project else str(uuid.uuid4())
        with self._changed:
            self._projects.add(project)
        return project

    # --- life cycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> FakeScanLedger:
        self._closing.clear()
        self._listen()
        return self

    def stop(self) -> None:
        self._closing.set()  # releases requests held by delay()
        self.refuse()

    def refuse(self) -> None:
        """Closes the listening socket and every open connection: clients get 'connection refused'."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._changed:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def resume(self) -> None:
        """Listens again on the same port."""
        if self._server is None:
            self._listen()

    def _listen(self) -> None:
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-scanledger", daemon=True
        )
        self._thread.start()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._changed:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    # --- fault injection ----------------------------------------------------------------------------

    def fail_next(self, status: int, count: int = 1, *, retry_after: int | None = None) -> None:
        """The next `count` requests (control endpoints excepted) get `status`."""
        with self._changed:
            self._faults.append(_Fault(status, count, None, retry_after))

    def fail_for(self, status: int, seconds: float, *, retry_after: int | None = None) -> None:
        """Every request for the next `seconds` gets `status`."""
        with self._changed:
            self._faults.append(_Fault(status, None, time.monotonic() + seconds, retry_after))

    def delay(self, seconds: float) -> None:
        """Every following request waits `seconds` before it is handled (0 ends it)."""
        with self._changed:
            self._delay = seconds

    def clear_faults(self) -> None:
        with self._changed:
            self._faults.clear()
            self._delay = 0.0

    # --- what happened ------------------------------------------------------------------------------

    @property
    def uploads(self) -> list[Upload]:
        with self._changed:
            return list(self._uploads)

    @property
    def rejections(self) -> list[Rejection]:
        with self._changed:
            return list(self._rejections)

    def wait_for(self, predicate: Callable[[FakeScanLedger], bool], timeout: float = 30.0) -> None:
        """Blocks until predicate(self) holds after some request; AssertionError after `timeout`."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"fake ScanLedger: condition not met; {self._summary()}")

    def _summary(self) -> str:
        rejected = [(r.status, r.reason) for r in self._rejections]
        return f"{len(self._uploads)} uploads, rejections {rejected}"

    # --- request handling (handler threads) ---------------------------------------------------------

    def _before_request(self) -> None:
        with self._changed:
            delay = self._delay
        if delay:
            self._closing.wait(delay)
        now = time.monotonic()
        with self._changed:
            self._faults = [f for f in self._faults if f.remaining != 0 and (f.until or now) >= now]
            if not self._faults:
                return
            fault = self._faults[0]
            if fault.remaining is not None:
                fault.remaining -= 1
        reason = f"injected {fault.status}"
        headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
        if fault.status >= 500:
            raise _Answer(fault.status, HTTPStatus(fault.status).phrase, reason, plain=True, headers=headers)
        raise _Answer(fault.status, reason, reason, headers=headers)

    def _reject(self, status: int, reason: str, path: str) -> None:
        with self._changed:
            self._rejections.append(Rejection(status, reason, path, time.time()))
            self._changed.notify_all()

    def _handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Message, body: bytes
    ) -> tuple[int, object]:
        if path == "/health":
            if method != "GET":
                raise _Answer(405, "Method Not Allowed", "method not allowed")
            return 200, {"status": "success"}
        if path == "/projects" and method == "GET":
            # Projects linked to the caller only (contract §5.3: the tasker and admin users see []).
            user = self._authenticate(headers.get("Authorization"))
            return 200, [
                {"id": project, "project_name": project[:8], "comment": None, "users": []}
                for project in sorted(user.projects)
            ]
        match = _IMPORT_PATH.fullmatch(path)
        if match is None:
            raise _Answer(404, "Not Found", f"no route {path}")
        if method != "POST":
            raise _Answer(405, "Method Not Allowed", "method not allowed")
        user = self._authenticate(headers.get("Authorization"))
        project, mode, track_history, parts = self._validate(match.group(1), query, headers, body)
        self._authorize(user, project)
        upload = parts[0]
        if upload.filename is None:
            # Starlette hands a part without filename over as a str; ScanLedger's reader then crashes.
            raise _Answer(500, "Internal Server Error", "file part without filename", plain=True)
        if len(upload.data) > self.max_upload:
            raise _Answer(413, "File too large", f"file of {len(upload.data)} bytes > {self.max_upload}")
        try:
            ips = check_report(upload.data)
        except ReportRejected as exc:
            if exc.status == 400:
                raise _Answer(400, CANNOT_IMPORT, exc.detail) from None
            raise _Answer(exc.status, "Internal Server Error", exc.detail, plain=True) from None
        self._accept(Upload(project, mode, track_history, upload.data, ips, time.time()))
        return 200, ips

    def _authenticate(self, header: str | None) -> _User:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Answer(401, "Not authenticated", "no bearer token")
        with self._changed:
            user = self._users.get(_token_hash(token.strip()))
        if user is None:
            raise _Answer(401, "Invalid token", "unknown token")
        if user.expires_at is not None and user.expires_at <= time.time():
            raise _Answer(401, "Token expired", "expired token")
        return user

    def _validate(
        self, project_id: str, query: dict[str, list[str]], headers: Message, body: bytes
    ) -> tuple[str, str, bool, list[_Part]]:
        errors: list[dict[str, object]] = []
        project = ""
        try:
            project = str(uuid.UUID(project_id))
        except ValueError:
            errors.append(
                {"type": "uuid_parsing", "loc": ["path", "project_id"], "msg": "Input should be a UUID"}
            )
        mode = query.get("mode", ["insert"])[-1]
        if mode not in IMPORT_MODES:
            errors.append({"type": "enum", "loc": ["query", "mode"], "msg": "Input should be an ImportMode"})
        history_text = query.get("track_history", ["true"])[-1].lower()
        if history_text not in _TRUE | _FALSE:
            errors.append({"type": "bool_parsing", "loc": ["query", "track_history"], "msg": "not a bool"})
        content_type = headers.get("Content-Type", "")
        parts: list[_Part] = []
        if content_type.lower().startswith("multipart/form-data"):
            try:
                parts = [p for p in _parse_multipart(body, content_type) if p.name == "file"]
            except _BadBody as exc:
                raise _Answer(400, "There was an error parsing the body", f"bad multipart: {exc}") from None
        if not parts:
            errors.append({"type": "missing", "loc": ["body", "file"], "msg": "Field required"})
        if errors:
            raise _Answer(
                422, errors, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
            )
        return project, mode, history_text in _TRUE, parts

    def _authorize(self, user: _User, project: str) -> None:
        with self._changed:
            exists = project in self._projects
        if user.admin:
            if not exists:
                raise _Answer(404, "Project not found", f"unknown project {project}")
        elif project not in user.projects:
            raise _Answer(401, "Not authorized for this project", f"not a member of {project}")

    def _accept(self, upload: Upload) -> None:
        with self._changed:
            self._uploads.append(upload)
            if self.state_file is not None:
                with self.state_file.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(upload.as_json()) + "\n")
            self._changed.notify_all()

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        """Read-only views and fault injection for tests running in another process."""
        if method == "GET" and path == "/_fake/uploads":
            return 200, [u.as_json() for u in self.uploads]
        if method == "GET" and path == "/_fake/rejections":
            return 200, [asdict(r) for r in self.rejections]
        if method == "POST" and path == "/_fake/fail":
            try:
                spec = json.loads(body or b"{}")
                self._inject(spec)
            except (ValueError, TypeError, KeyError) as exc:
                raise _Answer(422, f"bad fault spec: {exc}", "bad fault spec") from None
            return 200, {"ok": True}
        raise _Answer(404, "Not Found", f"no control route {method} {path}")

    def _inject(self, spec: dict[str, object]) -> None:
        retry_after = spec.get("retry_after")
        retry = int(retry_after) if isinstance(retry_after, int | str) else None
        if "refuse_seconds" in spec:
            # Nobody could call resume() over HTTP while refused, so a timer does it.
            self.refuse()
            timer = threading.Timer(float(str(spec["refuse_seconds"])), self.resume)
            timer.daemon = True
            timer.start()
        elif "delay" in spec:
            self.delay(float(str(spec["delay"])))
        elif "seconds" in spec:
            self.fail_for(int(str(spec["status"])), float(str(spec["seconds"])), retry_after=retry)
        elif "clear" in spec:
            self.clear_faults()
        else:
            self.fail_next(int(str(spec["status"])), int(str(spec.get("count", 1))), retry_after=retry)


@pytest.fixture
def scanledger() -> Iterator[FakeScanLedger]:
    """A started fake ScanLedger with an admin `token` and one `project`."""
    fake = FakeScanLedger()
    fake.token = fake.add_token()
    fake.project = fake.add_project()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.scanledger", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--token-file", type=Path, required=True, help="file holding an admin token")
    parser.add_argument("--project", action="append", default=[], help="project UUID (repeatable)")
    parser.add_argument("--state-file", type=Path, help="accepted uploads are appended here as JSON lines")
    parser.add_argument("--max-upload", type=int, default=DEFAULT_MAX_UPLOAD)
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain")
    parser.add_argument("--tls-key", type=Path, help="key of --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    fake = FakeScanLedger(
        args.host, args.port, max_upload=args.max_upload, state_file=args.state_file, tls=tls
    )
    fake.add_token(args.token_file.read_text().strip())
    for project in args.project:
        fake.add_project(project)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    fake.start()
    print(f"listening on {fake.url}", flush=True)  # the way a parent process learns the port
    done.wait()
    fake.stop()


if __name__ == "__main__":
    main()
