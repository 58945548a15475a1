"""Spool + Deliverer + ScanLedger client against the fake ScanLedger: every report delivered exactly once
through outages, refusals and a killed process; permanent refusals kept in failed/; the token never shown."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import traceback
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from falcoria_worker.delivery import Deliverer
from falcoria_worker.errors import DeliveryRejected, Retryable
from falcoria_worker.leases import report_owner
from falcoria_worker.ledger import LedgerUnavailable, ScanLedger
from falcoria_worker.redis_store import RedisStore
from falcoria_worker.spool import Spool, SpoolEntry
from tests.fakes.scanledger import FakeScanLedger, sample_report
from tests.support.drive import wait_until

pytestmark = pytest.mark.integration

WAIT = 60.0  # seconds a test waits for an event before it fails; no test asserts on durations
REPO = Path(__file__).resolve().parents[2]


class Results:
    """on_result sink; records whether the entry was already gone from pending/ when reported."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._queue: queue.Queue[tuple[str, str | None, bool]] = queue.Queue()

    def __call__(self, entry: SpoolEntry, reason: str | None) -> None:
        self._queue.put((entry.task_id, reason, self._spool.has(entry.task_id)))

    def next(self) -> tuple[str, str | None, bool]:
        return self._queue.get(timeout=WAIT)

    def empty(self) -> bool:
        return self._queue.empty()


class AttemptSignal(ScanLedger):
    """The real client; tells the test when an upload attempt has failed as retryable."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failed_attempt = queue.Queue[Exception]()

    def upload(self, project: str, mode: str, track_history: bool, xml_path: Path) -> list[str]:
        try:
            return super().upload(project, mode, track_history, xml_path)
        except Retryable as exc:
            self.failed_attempt.put(exc)
            raise


class Harness:
    """A spool in tmp_path, the fake ScanLedger, and the deliverers a test starts (stopped afterwards)."""

    def __init__(self, fake: FakeScanLedger, tmp_path: Path) -> None:
        self.fake = fake
        self.tmp = tmp_path
        self.spool = Spool(tmp_path / "spool")
        self.results = Results(self.spool)
        self.report = tmp_path / "merged.xml"
        self.report.write_bytes(sample_report("192.0.2.10"))
        self.deliverers: list[Deliverer] = []

    def ledger(self, token: str | None = None) -> AttemptSignal:
        return AttemptSignal(self.fake.url, token or self.fake.token)

    def start(self, ledger: ScanLedger | None = None, **options: Any) -> Deliverer:
        deliverer = Deliverer(
            self.spool,
            ledger or self.ledger(),
            on_result=self.results,
            backoff_initial=0.02,
            backoff_max=0.2,
            **options,
        )
        deliverer.start()
        self.deliverers.append(deliverer)
        return deliverer

    def put(self, task_id: str = "task-1", xml: Path | None = None, **fields: object) -> SpoolEntry:
        meta: dict = {"project": self.fake.project, "mode": "replace", "track_history": False} | fields
        return self.spool.put(task_id, xml or self.report, **meta)


@pytest.fixture
def h(scanledger: FakeScanLedger, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(scanledger, tmp_path)
    yield harness
    for deliverer in harness.deliverers:
        deliverer.stop(WAIT)
        assert not deliverer.is_alive()


def test_accepted_upload_is_exact_and_removed_before_reported(h: Harness) -> None:
    deliverer = h.start()
    h.put()
    deliverer.wake()
    assert h.results.next() == ("task-1", None, False)  # done() before on_result
    [upload] = h.fake.uploads
    assert upload.xml == h.report.read_bytes()
    assert (upload.project, upload.mode, upload.track_history) == (h.fake.project, "replace", False)
    assert h.spool.pending() == []


def test_entries_go_in_order(h: Harness) -> None:
    for n, mode in enumerate(("insert", "update", "append")):
        h.put(f"task-{n}", mode=mode)
    h.start()
    assert [h.results.next()[0] for _ in range(3)] == ["task-0", "task-1", "task-2"]
    assert [u.mode for u in h.fake.uploads] == ["insert", "update", "append"]


def test_503_for_a_while_then_exactly_one_upload(h: Harness) -> None:
    # 10 refusals outlast the adapter's 3 quick retries, so the spool's own backoff has to carry on.
    h.fake.fail_next(503, 10)
    h.put()
    h.start()
    assert h.results.next() == ("task-1", None, False)
    assert len(h.fake.uploads) == 1
    assert h.fake.uploads[0].xml == h.report.read_bytes()  # the body was rewound for every retry
    assert [r.status for r in h.fake.rejections] == [503] * 10


def test_connections_refused_then_exactly_one_upload(h: Harness) -> None:
    h.fake.refuse()
    ledger = h.ledger()
    h.put()
    h.start(ledger)
    assert "ConnectionError" in str(ledger.failed_attempt.get(timeout=WAIT))
    assert ledger.failed_attempt.get(timeout=WAIT)  # a second pass too: the spool keeps trying
    h.fake.resume()
    assert h.results.next() == ("task-1", None, False)
    assert len(h.fake.uploads) == 1
    assert h.spool.pending() == []


def test_the_deliverer_says_what_it_backs_off_for_until_a_pass_gets_through(h: Harness) -> None:
    h.fake.refuse()
    h.put("task-1")
    h.put("task-2")
    deliverer = h.start()
    wait_until(lambda: deliverer.problem is not None, timeout=WAIT, what="the outage noticed")
    assert deliverer.problem == "2 reports spooled: ScanLedger unavailable"
    h.fake.resume()
    assert [h.results.next()[0] for _ in range(2)] == ["task-1", "task-2"]
    wait_until(lambda: deliverer.problem is None, timeout=WAIT, what="the outage forgotten")


@pytest.mark.parametrize(("status", "how"), [(404, "project"), (422, "mode")])
def test_permanent_refusal_moves_to_failed_and_is_not_retried(h: Harness, status: int, how: str) -> None:
    token = None
    project = "0b9f7a8e-0000-4000-8000-000000000000" if how == "project" else h.fake.project
    mode = "merge" if how == "mode" else "insert"
    deliverer = h.start(h.ledger(token))
    h.put(project=project, mode=mode)
    deliverer.wake()
    task_id, reason, still_pending = h.results.next()
    assert (task_id, still_pending) == ("task-1", False)
    assert reason is not None and f"ScanLedger answered {status}" in reason
    assert h.spool.pending() == []
    assert (h.spool.failed_dir / "task-1" / "reason.txt").read_text() == reason + "\n"
    assert (h.spool.failed_dir / "task-1" / "nmap_report.xml").read_bytes() == h.report.read_bytes()
    # A second entry after it: by its result the deliverer has had every chance to retry the first.
    h.put("task-2", project=project, mode=mode)
    deliverer.wake()
    assert h.results.next()[:2] == ("task-2", reason)
    assert [r.status for r in h.fake.rejections] == [status, status]
    assert h.fake.uploads == []


def test_a_refused_token_keeps_every_report_pending(h: Harness) -> None:
    """An expired or rotated token is the worker's configuration, not the reports' fault: nothing is
    failed, everything waits (with backoff) for the token to be fixed."""
    h.put("task-1")
    h.put("task-2")
    h.start(h.ledger("not-the-token"))
    h.fake.wait_for(lambda f: len(f.rejections) >= 3, timeout=WAIT)
    assert {r.status for r in h.fake.rejections} == {401}
    assert [e.task_id for e in h.spool.pending()] == ["task-1", "task-2"]
    assert not h.spool.failed_dir.exists() or list(h.spool.failed_dir.iterdir()) == []
    assert h.results.empty()


def test_a_report_scanledger_chokes_on_does_not_block_the_others(h: Harness) -> None:
    bad = h.tmp / "bad.xml"
    bad.write_bytes(sample_report(port_xml='<script id="x" output="y"><elem>no key</elem></script>'))
    h.put("task-bad", bad)
    h.put("task-good")
    h.start()
    assert h.results.next() == ("task-good", None, False)
    assert [e.task_id for e in h.spool.pending()] == ["task-bad"]  # kept, retried later
    assert {r.status for r in h.fake.rejections} == {500}


def test_a_report_refused_again_and_again_while_others_pass_moves_to_failed(h: Harness) -> None:
    bad = h.tmp / "bad.xml"
    bad.write_bytes(sample_report(port_xml='<script id="x" output="y"><elem>no key</elem></script>'))
    h.put("task-bad", bad)
    h.put("task-good")
    h.start(give_up_after=2)
    assert h.results.next() == ("task-good", None, False)
    task_id, reason, _ = h.results.next()
    assert task_id == "task-bad"
    assert "not accepted after 2 attempts while other reports were" in reason
    assert h.spool.pending() == []
    assert len(h.fake.uploads) == 1


def test_scanledger_answering_500_to_everything_fails_nothing(h: Harness) -> None:
    h.fake.fail_for(500, 8.0)  # a server-wide outage: several tries of each entry (each try ~3 s)
    h.put("task-1")
    h.put("task-2")
    h.start(give_up_after=2)
    assert h.results.next() == ("task-1", None, False)
    assert h.results.next() == ("task-2", None, False)
    assert len(h.fake.uploads) == 2
    assert len(h.fake.rejections) >= 4  # both entries failed at least twice, neither was given up


def test_stop_leaves_pending_entries_for_the_next_process(h: Harness) -> None:
    h.fake.refuse()
    ledger = h.ledger()
    h.put()
    deliverer = h.start(ledger)
    ledger.failed_attempt.get(timeout=WAIT)
    deliverer.stop(WAIT)
    assert not deliverer.is_alive()
    assert [e.task_id for e in Spool(h.spool.root).pending()] == ["task-1"]
    assert h.results.empty()


# --- a killed delivering process --------------------------------------------------------------------


def child_main(root: str, url: str, token_file: str) -> None:
    """The delivering process of the restart test: prints one line per attempt and per result."""

    class Announcing(ScanLedger):
        def upload(self, project: str, mode: str, track_history: bool, xml_path: Path) -> list[str]:
            print("ATTEMPT", flush=True)
            return super().upload(project, mode, track_history, xml_path)

    spool = Spool(Path(root))
    ledger = Announcing(url, Path(token_file).read_text().strip())
    deliverer = Deliverer(
        spool,
        ledger,
        on_result=lambda entry, reason: print("RESULT", entry.task_id, reason, flush=True),
        backoff_initial=0.02,
        backoff_max=0.2,
    )
    deliverer.start()
    signal.sigwait({signal.SIGTERM})
    deliverer.stop(WAIT)


def _spawn(spool: Spool, fake: FakeScanLedger, token_file: Path) -> subprocess.Popen[str]:
    code = "import sys; from tests.integration.test_delivery import child_main; child_main(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", code, str(spool.root), fake.url, str(token_file)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
        start_new_session=True,
    )


def _read_until(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:  # the test's timeout bounds this; each line comes within backoff_max
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"child exited ({proc.wait()}) before printing {prefix!r}")


def test_killed_delivering_process_then_restart_delivers_exactly_once(h: Harness) -> None:
    scanledger, spool, report = h.fake, h.spool, h.report
    token_file = h.tmp / "token"
    token_file.write_text(scanledger.token)
    h.put()
    scanledger.refuse()
    first = _spawn(spool, scanledger, token_file)
    try:
        _read_until(first, "ATTEMPT")
        _read_until(first, "ATTEMPT")  # retrying while ScanLedger is down
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(timeout=WAIT) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [e.task_id for e in Spool(spool.root).pending()] == ["task-1"]
    scanledger.resume()
    second = _spawn(spool, scanledger, token_file)
    try:
        assert _read_until(second, "RESULT") == "RESULT task-1 None"
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=WAIT) in (0, -signal.SIGTERM)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert len(scanledger.uploads) == 1
    assert scanledger.uploads[0].xml == report.read_bytes()
    assert Spool(spool.root).pending() == []


# --- the token stays secret ---------------------------------------------------------------------------


def test_token_never_in_logs_exceptions_or_file_names(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 included
    scanledger, spool, report = h.fake, h.spool, h.report
    wrong = "wrong-" + scanledger.token
    texts: list[str] = []

    def attempt(ledger: ScanLedger) -> None:
        try:
            ledger.upload(scanledger.project, "insert", True, report)
        except (Retryable, DeliveryRejected) as exc:
            texts.extend([str(exc), repr(exc), "".join(traceback.format_exception(exc))])

    good, bad = ScanLedger(scanledger.url, scanledger.token), ScanLedger(scanledger.url, wrong)
    scanledger.fail_next(503, 10)
    attempt(good)  # 5xx after retries
    scanledger.refuse()
    attempt(good)  # connection refused
    scanledger.resume()
    attempt(bad)  # 401
    texts.append(repr(good))
    # The spool path: a refusal (reason file, on_result) and a delivery.
    h.put("task-refused", mode="merge")
    h.put("task-ok")
    h.start(good)
    outcomes = [h.results.next(), h.results.next()]
    assert len(texts) == 10
    texts.extend(str(o) for o in outcomes)
    texts.extend(p.read_text() for p in spool.root.rglob("reason.txt"))
    texts.extend(str(p) for p in spool.root.rglob("*"))
    texts.append(caplog.text)
    texts.extend(str(r.__dict__) for r in caplog.records)
    assert [o[1] is None for o in outcomes] == [False, True]
    for token in (scanledger.token, wrong):
        leaks = [t for t in texts if token in t]
        assert leaks == []
    assert any("503" in t for t in texts) and any("ConnectionError" in t for t in texts)


# --- the client on its own ----------------------------------------------------------------------------


def test_refused_report_retried_from_the_command_line_is_delivered_once(h: Harness) -> None:
    """ScanLedger refuses a report for good (unknown project); the operator fixes ScanLedger and runs
    `falcoria-worker spool retry` in another process; the running deliverer picks it up by itself."""
    project = str(uuid.uuid4())  # not created in ScanLedger yet: 404, a permanent refusal
    h.start(rescan_every=0.1)
    h.put(project=project)
    task_id, reason, _ = h.results.next()
    assert task_id == "task-1" and reason is not None and "404" in reason
    assert (h.spool.failed_dir / "task-1").is_dir()
    h.fake.add_project(project)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
    listing = subprocess.run(
        [sys.executable, "-m", "falcoria_worker", "spool", "list", "--json", "--set", f"STATE_DIR={h.tmp}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    [failed] = json.loads(listing.stdout)["entries"]
    assert (failed["state"], failed["name"], failed["reason"]) == ("failed", "task-1", reason)
    retry = subprocess.run(
        [sys.executable, "-m", "falcoria_worker", "spool", "retry", "task-1", "--set", f"STATE_DIR={h.tmp}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert retry.returncode == 0, retry.stderr
    assert h.results.next() == ("task-1", None, False)
    [upload] = h.fake.uploads
    assert (upload.project, upload.xml) == (project, h.report.read_bytes())
    assert h.spool.held() == []


def test_health(h: Harness) -> None:
    ledger = ScanLedger(h.fake.url, h.fake.token)
    ledger.health()
    h.fake.fail_next(503, 10)
    with pytest.raises(LedgerUnavailable, match="503"):
        ledger.health()
    h.fake.refuse()
    with pytest.raises(LedgerUnavailable, match="ConnectionError"):
        ledger.health()


def test_tls_is_verified_by_default_and_a_ca_bundle_is_honoured(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
            ),
            *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    fake = FakeScanLedger(tls=(cert, key))
    token, project = fake.add_token(), fake.add_project()
    report = tmp_path / "r.xml"
    report.write_bytes(sample_report())
    fake.start()
    try:
        assert fake.url.startswith("https://")
        with pytest.raises(LedgerUnavailable, match="SSLError"):
            ScanLedger(fake.url, token).upload(project, "insert", True, report)
        assert fake.uploads == []
        verified = ScanLedger(fake.url, token, ca_bundle=str(cert))
        assert verified.upload(project, "insert", True, report) == ["127.0.0.1"]
        assert len(fake.uploads) == 1
    finally:
        fake.stop()


def test_a_large_report_is_streamed_not_loaded(tmp_path: Path) -> None:
    """20 MB through an out-of-process fake (so only the client's memory is measured), with one retry."""
    report = tmp_path / "big.xml"
    hosts = 10_000  # few IPs, big script output: the answer (a list of IPs) stays small
    script = f'<script id="banner" output="{"x" * 2_000}"/>'
    report.write_bytes(sample_report(*(f"10.0.{n >> 8}.{n & 255}" for n in range(hosts)), port_xml=script))
    size = report.stat().st_size
    assert size > 20_000_000
    token_file = tmp_path / "token"
    token_file.write_text("big-report-token")
    project = str(uuid.uuid4())
    argv = [
        sys.executable,
        "-m",
        "tests.fakes.scanledger",
        "--token-file",
        str(token_file),
        "--project",
        project,
    ]
    fake = subprocess.Popen([*argv, "--project", project], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert fake.stdout is not None
        url = fake.stdout.readline().split()[-1]
        ledger = ScanLedger(url, "big-report-token")
        ledger.health()
        requests.post(f"{url}/_fake/fail", json={"status": 503, "count": 1}, timeout=WAIT).raise_for_status()
        tracemalloc.start()
        try:
            ips = ledger.upload(project, "insert", True, report)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(ips) == hosts
        assert peak < size / 10, f"client peaked at {peak} bytes for a {size}-byte report"
        [upload] = requests.get(f"{url}/_fake/uploads", timeout=WAIT).json()
        assert upload["size"] == size
        assert upload["sha256"] == hashlib.sha256(report.read_bytes()).hexdigest()
    finally:
        fake.terminate()
        fake.wait(timeout=WAIT)


def test_a_report_goes_out_only_while_its_task_is_ours(h: Harness, redis_server) -> None:
    """Its lease released by us: uploaded. Taken over by another instance: removed unsent, nothing
    reported. Our release still on the way: it waits for it. Redis gone: nothing goes out."""
    redis_server.flush()
    store = RedisStore(redis_server.client(), "scanner-1", status_ttl=600)
    for task_id in ("ours", "theirs", "pending"):
        assert store.claim(task_id, "A", 60, "m", 5) == "claimed"
    assert store.release("ours", "A")
    assert store.requeue_lease("theirs", "A") == "m"  # as a sweep does, once the lease expired
    assert store.claim("theirs", "B", 60, "m", 5) == "claimed"
    for task_id in ("ours", "theirs", "pending"):
        h.put(task_id)
    h.start(confirm=report_owner(store, "A"))
    assert h.results.next() == ("ours", None, False)
    wait_until(lambda: not h.spool.has("theirs"), timeout=WAIT, what="the taken-over report dropped")
    assert h.spool.has("pending")
    assert store.release("pending", "A")
    assert h.results.next() == ("pending", None, False)
    assert h.results.empty()
    assert sorted(u.project for u in h.fake.uploads) == [h.fake.project] * 2


def test_no_upload_while_redis_cannot_tell_whose_the_report_is(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, decode_responses=True)  # nothing listens
    h.put()
    caplog.set_level(logging.WARNING, logger="falcoria_worker.delivery")

    def passes_cut_short() -> int:
        return sum("lease of its task cannot be confirmed" in r.getMessage() for r in caplog.records)

    h.start(confirm=report_owner(RedisStore(dead, "scanner-1", status_ttl=600), "A"))
    wait_until(lambda: passes_cut_short() >= 2, timeout=WAIT, what="two passes backed off")
    assert h.fake.uploads == [] and h.spool.has("task-1")
