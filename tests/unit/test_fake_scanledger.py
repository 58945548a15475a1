"""The fake ScanLedger against the rules of contract §5: a fake that accepts what the real server refuses
would let every delivery test pass for the wrong reason."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests

from tests.fakes.scanledger import FakeScanLedger, ReportRejected, check_report, sample_report

SCRIPT_OK = '<script id="http-title" output="Index"><elem key="title">Index</elem></script>'


def _without(path: str, attr: str | None) -> bytes:
    """sample_report() with the attribute (or, for attr None, the element) at `path` removed."""
    root = ET.fromstring(sample_report(port_xml=SCRIPT_OK))  # noqa: S314 - our own test input
    if attr is None:
        parent_path, _, tag = path.rpartition("/")
        parent = root if not parent_path else root.find(parent_path)
        assert parent is not None
        child = parent.find(tag)
        assert child is not None
        parent.remove(child)
    else:
        el = root if path == "." else root.find(path)
        assert el is not None and attr in el.attrib
        del el.attrib[attr]
    return ET.tostring(root)


def _status(xml: bytes) -> int:
    with pytest.raises(ReportRejected) as info:
        check_report(xml)
    return info.value.status


# --- check_report ------------------------------------------------------------------------------------


def test_accepts_a_complete_report_and_returns_canonical_unique_ips() -> None:
    assert check_report(sample_report()) == ["127.0.0.1"]
    assert check_report(sample_report("::0001", "10.0.0.1", "::1")) == ["::1", "10.0.0.1"]


def test_empty_file_and_report_without_host_are_400() -> None:
    assert _status(b"") == 400
    assert _status(_without("host", None)) == 400


@pytest.mark.parametrize(
    "xml",
    [sample_report()[:200], b"not xml", b"<nmaprun", "<nmaprun>é</nmaprun>".encode("latin-1"), b"   "],
    ids=["truncated", "text", "unclosed", "not-utf8", "whitespace"],
)
def test_unparsable_xml_is_500(xml: bytes) -> None:
    assert _status(xml) == 500


REQUIRED_ATTRS = [
    *((".", a) for a in ("scanner", "args", "start", "startstr", "version", "xmloutputversion")),
    *(("scaninfo", a) for a in ("type", "protocol", "numservices", "services")),
    ("verbose", "level"),
    ("debugging", "level"),
    ("host", "starttime"),
    ("host", "endtime"),
    *(("host/status", a) for a in ("state", "reason", "reason_ttl")),
    ("host/address", "addr"),
    ("host/address", "addrtype"),
    ("host/ports/port", "protocol"),
    ("host/ports/port", "portid"),
    *(("host/ports/port/state", a) for a in ("state", "reason", "reason_ttl")),
    ("host/ports/port/script", "id"),
    ("host/ports/port/script", "output"),
]


@pytest.mark.parametrize(("path", "attr"), REQUIRED_ATTRS, ids=[f"{p}@{a}" for p, a in REQUIRED_ATTRS])
def test_missing_required_attribute_is_500(path: str, attr: str) -> None:
    assert _status(_without(path, attr)) == 500


@pytest.mark.parametrize(
    "path",
    [
        "scaninfo",
        "verbose",
        "debugging",
        "host/status",
        "host/address",
        "host/ports",
        "host/ports/port/state",
    ],
)
def test_missing_required_element_is_500(path: str) -> None:
    assert _status(_without(path, None)) == 500


def test_port_state_must_be_a_port_state() -> None:
    for state in ("open", "closed", "filtered", "unfiltered", "open|filtered", "closed|filtered"):
        assert check_report(sample_report().replace(b'state="open"', f'state="{state}"'.encode()))
    assert _status(sample_report().replace(b'state="open"', b'state="up"')) == 500


def test_integers_must_be_integers() -> None:
    assert _status(sample_report().replace(b'portid="80"', b'portid="http"')) == 500
    assert _status(sample_report().replace(b'start="1700000000"', b'start="soon"')) == 500


def test_keyless_elem_in_a_script_is_500_and_keyed_is_accepted() -> None:
    keyless = '<script id="http-server-header" output="x"><elem>SimpleHTTP/0.6</elem></script>'
    nested = '<script id="s" output="x"><table key="t"><elem>v</elem></table></script>'
    assert _status(sample_report(port_xml=keyless)) == 500
    assert _status(sample_report(port_xml=nested)) == 500
    assert check_report(sample_report(port_xml=keyless.replace("<elem>", '<elem key="1">')))


def test_optional_parts_are_optional_and_the_root_tag_is_not_checked() -> None:
    assert check_report(sample_report().replace(b"<hostnames>", b"<x>").replace(b"</hostnames>", b"</x>"))
    assert check_report(sample_report().replace(b"nmaprun", b"report"))


def test_first_address_must_be_an_ip() -> None:
    assert _status(sample_report().replace(b'addr="127.0.0.1"', b'addr="localhost"')) == 500


# --- the server --------------------------------------------------------------------------------------


def _import(
    fake: FakeScanLedger,
    xml: bytes = b"",
    *,
    token: str | None = None,
    project: str | None = None,
    params: dict[str, str] | None = None,
    filename: str | None = "nmap_report.xml",
    session: requests.Session | None = None,
) -> requests.Response:
    headers = {"Authorization": f"Bearer {token or fake.token}"}
    files = {"file": (filename, xml or sample_report(), "text/xml")}
    url = f"{fake.url}/projects/{project or fake.project}/ips/import"
    return (session or requests).post(url, params=params, files=files, headers=headers, timeout=30)


def test_health(scanledger: FakeScanLedger) -> None:
    response = requests.get(f"{scanledger.url}/health", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "success"}


def test_accepted_import_records_exact_bytes_mode_and_history(scanledger: FakeScanLedger) -> None:
    xml = sample_report("10.0.0.1", "10.0.0.2")
    response = _import(scanledger, xml, params={"mode": "replace", "track_history": "false"})
    assert response.status_code == 200
    assert response.json() == ["10.0.0.1", "10.0.0.2"]
    [upload] = scanledger.uploads
    assert (upload.project, upload.mode, upload.track_history, upload.ips) == (
        scanledger.project,
        "replace",
        False,
        ["10.0.0.1", "10.0.0.2"],
    )
    assert upload.xml == xml


def test_mode_defaults_to_insert_and_history_to_true(scanledger: FakeScanLedger) -> None:
    assert _import(scanledger).status_code == 200
    assert (scanledger.uploads[0].mode, scanledger.uploads[0].track_history) == ("insert", True)


def test_tokens_are_checked_by_hash(scanledger: FakeScanLedger) -> None:
    assert _import(scanledger, token="wrong").status_code == 401
    response = requests.post(
        f"{scanledger.url}/projects/{scanledger.project}/ips/import",
        files={"file": ("nmap_report.xml", sample_report(), "text/xml")},
        timeout=30,
    )
    assert response.status_code == 401
    expired = scanledger.add_token(expires_at=time.time() - 1)
    assert _import(scanledger, token=expired).status_code == 401
    # The fake keeps hashes only, as ScanLedger does.
    assert hashlib.sha256(scanledger.token.encode()).hexdigest() in scanledger._users
    assert scanledger.token not in scanledger._users
    assert scanledger.uploads == []


def test_project_access_admin_vs_member(scanledger: FakeScanLedger) -> None:
    other = scanledger.add_project()
    member = scanledger.add_token(admin=False, projects=(other,))
    assert _import(scanledger, project=str(uuid.uuid4())).status_code == 404  # admin, unknown project
    assert _import(scanledger, token=member, project=scanledger.project).status_code == 401  # not a member
    assert _import(scanledger, token=member, project=str(uuid.uuid4())).status_code == 401
    assert _import(scanledger, token=member, project=other).status_code == 200
    assert [u.project for u in scanledger.uploads] == [other]


@pytest.mark.parametrize(
    ("project", "params"),
    [("not-a-uuid", None), (None, {"mode": "merge"}), (None, {"track_history": "maybe"})],
    ids=["project", "mode", "track_history"],
)
def test_bad_parameters_are_422(scanledger: FakeScanLedger, project: str | None, params: dict | None) -> None:
    response = _import(scanledger, project=project, params=params)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], list)


def test_missing_file_field_is_422(scanledger: FakeScanLedger) -> None:
    url = f"{scanledger.url}/projects/{scanledger.project}/ips/import"
    headers = {"Authorization": f"Bearer {scanledger.token}"}
    wrong_field = {"report": ("nmap_report.xml", sample_report(), "text/xml")}
    assert requests.post(url, files=wrong_field, headers=headers, timeout=30).status_code == 422
    assert requests.post(url, data=sample_report(), headers=headers, timeout=30).status_code == 422


def test_file_without_filename_is_500(scanledger: FakeScanLedger) -> None:
    response = _import(scanledger, filename=None)
    assert response.status_code == 500
    assert response.text == "Internal Server Error"


def test_report_verdicts_come_from_check_report(scanledger: FakeScanLedger) -> None:
    empty = requests.post(
        f"{scanledger.url}/projects/{scanledger.project}/ips/import",
        files={"file": ("nmap_report.xml", b"", "text/xml")},
        headers={"Authorization": f"Bearer {scanledger.token}"},
        timeout=30,
    )
    assert (empty.status_code, empty.json()) == (400, {"detail": "Cannot import Report"})
    assert _import(scanledger, sample_report()[:150]).status_code == 500
    assert [r.status for r in scanledger.rejections] == [400, 500]
    assert scanledger.uploads == []


def test_upload_above_the_limit_is_413() -> None:
    fake = FakeScanLedger(max_upload=len(sample_report()) - 1)
    fake.token, fake.project = fake.add_token(), fake.add_project()
    fake.start()
    try:
        assert _import(fake).status_code == 413
        fake.max_upload = len(sample_report())
        assert _import(fake).status_code == 200
    finally:
        fake.stop()


def test_fail_next_and_fail_for(scanledger: FakeScanLedger) -> None:
    scanledger.fail_next(503, 2, retry_after=7)
    first = _import(scanledger)
    assert (first.status_code, first.headers["Retry-After"]) == (503, "7")
    assert _import(scanledger).status_code == 503
    assert _import(scanledger).status_code == 200
    scanledger.fail_for(502, 3600)
    assert _import(scanledger).status_code == 502
    assert requests.get(f"{scanledger.url}/health", timeout=30).status_code == 502
    scanledger.clear_faults()
    assert _import(scanledger).status_code == 200
    assert [(r.status, r.reason) for r in scanledger.rejections] == [
        (503, "injected 503"),
        (503, "injected 503"),
        (502, "injected 502"),
        (502, "injected 502"),
    ]
    assert len(scanledger.uploads) == 2


def test_delay_holds_requests(scanledger: FakeScanLedger) -> None:
    scanledger.delay(30)
    with pytest.raises(requests.ReadTimeout):
        requests.get(f"{scanledger.url}/health", timeout=0.2)
    scanledger.delay(0)
    assert requests.get(f"{scanledger.url}/health", timeout=30).status_code == 200


def test_refuse_closes_pooled_connections_and_resume_uses_the_same_port(scanledger: FakeScanLedger) -> None:
    session = requests.Session()
    assert _import(scanledger, session=session).status_code == 200  # leaves a keep-alive connection
    port = scanledger.port
    scanledger.refuse()
    with pytest.raises(requests.ConnectionError):
        _import(scanledger, session=session)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{scanledger.url}/health", timeout=30)
    scanledger.resume()
    assert scanledger.port == port
    assert _import(scanledger, session=session).status_code == 200
    assert len(scanledger.uploads) == 2


def test_runs_out_of_process_with_control_endpoints(tmp_path: Path) -> None:
    token_file, state_file = tmp_path / "token", tmp_path / "uploads.jsonl"
    token_file.write_text("out-of-process-token\n")
    project = str(uuid.uuid4())
    argv = [sys.executable, "-m", "tests.fakes.scanledger", "--port", "0", "--token-file", str(token_file)]
    proc = subprocess.Popen(
        [*argv, "--project", project, "--state-file", str(state_file)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        remote = FakeScanLedger()  # only to reuse _import's URL building
        remote.host, remote.port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        remote.token, remote.project = "out-of-process-token", project
        xml = sample_report("192.0.2.7")
        assert _import(remote, xml, params={"mode": "append"}).status_code == 200
        requests.post(f"{url}/_fake/fail", json={"status": 503, "count": 1}, timeout=30).raise_for_status()
        assert _import(remote, xml).status_code == 503
        [upload] = requests.get(f"{url}/_fake/uploads", timeout=30).json()
        assert (upload["project"], upload["mode"], upload["ips"]) == (project, "append", ["192.0.2.7"])
        assert base64.b64decode(upload["xml_b64"]) == xml
        assert upload["sha256"] == hashlib.sha256(xml).hexdigest()
        rejections = requests.get(f"{url}/_fake/rejections", timeout=30).json()
        assert [r["status"] for r in rejections] == [503]
        [line] = state_file.read_text().splitlines()
        assert json.loads(line)["sha256"] == upload["sha256"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
