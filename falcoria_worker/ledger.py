"""ScanLedger HTTP client: the one place the worker talks to ScanLedger (contract §5).

Errors are classified for the spool: 2xx -> the IPs ScanLedger touched; 429, 5xx, connection errors and
timeouts -> `LedgerUnavailable` (a `Retryable`); any other status -> `DeliveryRejected`.
The bearer token lives only in the request header: it is never logged, and every message built from a
peer's answer or a transport error is scrubbed of it.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from falcoria_worker.errors import ConfigError, DeliveryRejected, Retryable

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REPORT_FILENAME = "nmap_report.xml"  # what the upstream worker sends; ScanLedger answers 500 without one
_DETAIL_MAX = 300
_CONNECT_TIMEOUT_MAX = 10.0


class LedgerUnavailable(Retryable):
    """ScanLedger could not be reached, timed out, or answered 429/5xx.

    `status` is None for transport errors. `retry_after` is the server's Retry-After in seconds, if any.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class _CappedRetry(Retry):
    """urllib3 Retry whose Retry-After sleep is capped: a server asking for an hour must not park the
    delivery thread inside one request. The spool's own backoff honours the longer wait instead."""

    RETRY_AFTER_CAP = 15.0

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.RETRY_AFTER_CAP)


def make_session() -> requests.Session:
    """A session whose adapter retries a few times within one upload.

    Connection errors: 3 more tries. 429/5xx: 3 more tries, POST included (ScanLedger's import commits
    nothing before it answers them), waiting Retry-After (capped) or 0, 1, 2 s with jitter. Read errors are
    not retried here: the request may have been processed, so the spool decides, after its backoff.
    """
    retry = _CappedRetry(
        total=3,
        connect=3,
        read=0,
        status=3,
        other=0,
        redirect=0,
        allowed_methods=None,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=0.5,
        backoff_max=8.0,
        backoff_jitter=0.5,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _Bearer(AuthBase):
    """Sets the header per request. Passing an auth object also stops requests from applying ~/.netrc,
    which would silently replace the bearer header."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "_Bearer(<redacted>)"


class MultipartFile(io.RawIOBase):
    """A multipart/form-data body with one file part, read from the file as it is sent.

    The report is never loaded into memory; the length is known up front (Content-Length, no chunking),
    and `seek`/`tell` let urllib3 rewind the body for a retry.
    """

    def __init__(self, path: Path, *, field: str, filename: str, content_type: str) -> None:
        super().__init__()
        boundary = secrets.token_hex(16)
        self.content_type = f"multipart/form-data; boundary={boundary}"
        self._head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        self._file = path.open("rb")
        self._size = os.fstat(self._file.fileno()).st_size
        self._pos = 0

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self)}[whence]
        self._pos = max(0, min(len(self), base + offset))
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = len(self) - self._pos
        out = bytearray()
        while len(out) < size and self._pos < len(self):
            out += self._read_segment(size - len(out))
        return bytes(out)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _read_segment(self, size: int) -> bytes:
        head, body_end = len(self._head), len(self._head) + self._size
        if self._pos < head:
            data = self._head[self._pos : self._pos + size]
        elif self._pos < body_end:
            self._file.seek(self._pos - head)
            data = self._file.read(min(size, body_end - self._pos))
            if not data:
                raise OSError(f"{self._file.name} shrank while it was being uploaded")
        else:
            data = self._tail[self._pos - body_end : self._pos - body_end + size]
        self._pos += len(data)
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


class ScanLedger:
    """Client of ScanLedger's import endpoint. Safe to use from one thread at a time."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        ca_bundle: str | None = None,
        timeout: float = 60,
        session: requests.Session | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                "BACKEND_BASE_URL", f"{base_url!r} is not an http(s) URL", "use https://host[:port]"
            )
        if not token:
            raise ConfigError("WORKER_BACKEND_TOKEN", "empty", "set the ScanLedger token")
        self._base = base_url.rstrip("/")
        self._token = token
        self._auth = _Bearer(token)
        self._verify: str | bool = ca_bundle or True
        self._timeout = (min(timeout, _CONNECT_TIMEOUT_MAX), timeout)
        self._session = session or make_session()

    def __repr__(self) -> str:
        return f"ScanLedger({self._base!r})"

    def upload(self, project: str, mode: str, track_history: bool, xml_path: Path) -> list[str]:
        """Imports one report; returns the IPs ScanLedger reports as touched."""
        url = f"{self._base}/projects/{quote(project, safe='')}/ips/import"
        params = {"mode": mode, "track_history": "true" if track_history else "false"}
        with MultipartFile(xml_path, field="file", filename=REPORT_FILENAME, content_type="text/xml") as body:
            response = self._request(
                "POST", url, params=params, data=body, headers={"Content-Type": body.content_type}
            )
        with response:
            if 200 <= response.status_code < 300:
                return self._ips(response)
            self._raise_for(response)

    def health(self) -> None:
        """GET /health; raises LedgerUnavailable unless ScanLedger answers 200."""
        with self._request("GET", f"{self._base}/health") as response:
            if response.status_code != 200:
                raise LedgerUnavailable(
                    f"ScanLedger health answered {response.status_code}", status=response.status_code
                )

    def check_token(self) -> None:
        """GET /projects, which needs a valid token (unlike /health); raises LedgerUnavailable if the
        token is refused or ScanLedger is down."""
        with self._request("GET", f"{self._base}/projects") as response:
            if response.status_code != 200:
                self._raise_for(response)

    def _request(self, method: str, url: str, **kwargs: object) -> requests.Response:
        try:
            return self._session.request(
                method,
                url,
                auth=self._auth,
                verify=self._verify,
                timeout=self._timeout,
                allow_redirects=False,  # a redirect must not carry the report (or the token) elsewhere
                **kwargs,  # type: ignore[arg-type]
            )
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as exc:
            raise ConfigError("BACKEND_BASE_URL", self._scrub(str(exc)), "fix the URL") from None
        except requests.RequestException as exc:
            # `from None`: the chained exception would carry the prepared request, header included.
            raise LedgerUnavailable(
                self._scrub(f"ScanLedger unreachable: {type(exc).__name__}: {exc}")
            ) from None

    def _ips(self, response: requests.Response) -> list[str]:
        try:
            ips = response.json()
        except ValueError:
            ips = None
        if not isinstance(ips, list):
            # Accepted all the same: retrying would import the report twice.
            log.warning("ScanLedger accepted the report but its answer is not a list of IPs")
            return []
        return [str(ip) for ip in ips]

    def _raise_for(self, response: requests.Response) -> NoReturn:
        status = response.status_code
        detail = self._detail(response)
        if status == 429 or status >= 500:
            raise LedgerUnavailable(
                f"ScanLedger answered {status}: {detail}", status=status, retry_after=_retry_after(response)
            )
        if status in (401, 403):
            # The token (expired, rotated, wrong) is this worker's configuration, not the report's
            # fault: every report would be refused alike. Keep them pending until it is fixed.
            raise LedgerUnavailable(
                f"ScanLedger refused the token ({status}: {detail}); fix WORKER_BACKEND_TOKEN, "
                "reports stay pending",
                status=status,
            )
        if 300 <= status < 400:
            detail = f"unexpected redirect to {self._scrub(response.headers.get('Location', '?'))}"
        raise DeliveryRejected(status, detail)

    def _detail(self, response: requests.Response) -> str:
        try:
            body = response.json()
            text = str(body.get("detail", body)) if isinstance(body, dict) else str(body)
        except ValueError:
            text = response.text
        text = " ".join(text.split())
        return self._scrub(text[:_DETAIL_MAX] or response.reason or "")

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>")


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # the HTTP-date form is not worth parsing: the spool's backoff covers it
