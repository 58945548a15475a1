"""logs.py: journal fields, stderr lines, task context per thread, and redaction before any handler."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from falcoria_worker import logs
from falcoria_worker.logs import Redactor, set_phase, setup_logging, stderr_is_journal, task_context

SECRET = "s3cr3t/p@ss w0rd"  # '/', '@' and ' ' make its encoded forms differ from the raw one
TOKEN = "tok-8f14e45fceea167a5a36dedd4bea2543"

log = logging.getLogger("falcoria_worker.test")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, factory = list(root.handlers), root.level, logging.getLogRecordFactory()
    noisy = {name: logging.getLogger(name).level for name in logs.NOISY_LOGGERS}
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.setLogRecordFactory(factory)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)
    logging.captureWarnings(False)


class Journal:
    """Stands in for systemd.journal.send, as python-systemd's own tests do."""

    def __init__(self) -> None:
        self.entries: list[dict[str, object]] = []

    def __call__(self, message: str, /, **fields: object) -> None:
        self.entries.append({"MESSAGE": message, **fields})


@pytest.fixture
def journal() -> Journal:
    sender = Journal()
    setup_logging("DEBUG", instance="3", secrets=[SECRET, TOKEN], journal=True, journal_sender=sender)
    return sender


# --- redaction, pure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f"password is {SECRET}",
        f"url amqp://guest:{quote(SECRET, safe='')}@rabbit:5672/%2F",
        f"form data={quote(SECRET)}",
        f"args=({SECRET!r},)",
        f"auth token: {TOKEN}",
    ],
)
def test_configured_secrets_are_removed_in_every_form(text: str) -> None:
    cleaned = Redactor([SECRET, TOKEN])(text)
    assert "s3cr3t" not in cleaned
    assert "8f14e45f" not in cleaned
    assert logs.MASK in cleaned


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ("headers={'Authorization': 'Basic dXNlcjpwYXNz'}", "headers={'Authorization': 'Basic ***'}"),
        ("sent bearer eyJhbGciOi.J9== to ledger", "sent bearer *** to ledger"),
        ("amqp://guest:p@ss@rabbit:5672/vhost", "amqp://guest:***@rabbit:5672/vhost"),
        ("redis://:hunter2@redis:6379/3", "redis://:***@redis:6379/3"),
        ("login password=hunter2 user=x", "login password=*** user=x"),
        ("REDIS_PASS: hunter2", "REDIS_PASS: ***"),
        ('{"token": "abc123", "ip": "1.2.3.4"}', '{"token": "***", "ip": "1.2.3.4"}'),
        ("GET /import?mode=insert&api_key=zzz&x=1", "GET /import?mode=insert&api_key=***&x=1"),
        ("WORKER_BACKEND_TOKEN=abc", "WORKER_BACKEND_TOKEN=***"),
        ("password='a b c' user=x", "password='***' user=x"),
        ('{"secret": "two words", "n": 1}', '{"secret": "***", "n": 1}'),
        ("password='unterminated", "password='***"),
    ],
)
def test_generic_secret_shapes(text: str, expected: str) -> None:
    assert Redactor([])(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "nmap -n -Pn --top-ports 1000 -oX /var/lib/falcoria-worker/1/x.xml -- 192.0.2.7",
        "task 6f1c phase=ports_scan open ports 22,80 (2 tokens)",
        "https://ledger.example:8443/projects/p/ips/import?mode=insert",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert Redactor([SECRET])(text) == text


def test_redaction_is_idempotent() -> None:
    redact = Redactor([SECRET])
    once = redact(f"amqp://u:{SECRET}@h token={SECRET} Authorization: Bearer {SECRET}")
    assert redact(once) == once


# --- journal path ---------------------------------------------------------------------------------------


def test_journal_records_carry_structured_fields(journal: Journal) -> None:
    with task_context(task_id="t-1", project_id="p-1", target="192.0.2.7", phase="ports_scan"):
        log.info("phase %s started", 1)
        set_phase("service_scan")
        log.error("phase failed")
    log.debug("idle")

    first, second, third = journal.entries
    assert first["MESSAGE"] == "[task=t-1 project=p-1 target=192.0.2.7 phase=ports_scan] phase 1 started"
    assert {k: first[k] for k in ("TASK_ID", "PROJECT_ID", "TARGET", "PHASE", "INSTANCE", "PRIORITY")} == {
        "TASK_ID": "t-1",
        "PROJECT_ID": "p-1",
        "TARGET": "192.0.2.7",
        "PHASE": "ports_scan",
        "INSTANCE": "3",
        "PRIORITY": "6",
    }
    assert first["SYSLOG_IDENTIFIER"] == "falcoria-worker"
    assert (second["PHASE"], second["PRIORITY"]) == ("service_scan", "3")
    assert third["MESSAGE"] == "idle"
    assert third["PRIORITY"] == "7"
    assert "TASK_ID" not in third


def test_extra_fields_win_over_the_context(journal: Journal) -> None:
    with task_context(task_id="t-1"):
        log.info("recovered", extra={"TASK_ID": "t-2"})
    assert journal.entries[0]["TASK_ID"] == "t-2"


def test_no_secret_reaches_the_journal(journal: Journal) -> None:
    class LeakyError(Exception):
        def __repr__(self) -> str:
            return f"LeakyError({SECRET!r})"

    log.info("connecting to %s", f"amqp://guest:{quote(SECRET, safe='')}@rabbit/%2F")
    log.info("config %r", {"token": TOKEN, "other": [SECRET]})
    log.warning("upload", extra={"URL": f"https://h/?token={TOKEN}", "DETAIL": SECRET})
    try:
        raise LeakyError(f"login failed for password {SECRET}")
    except LeakyError:
        log.exception("broker said no")
    log.info("auth token: %s", TOKEN)  # what upstream logs at DEBUG (contract §7)

    everything = repr(journal.entries)
    assert "s3cr3t" not in everything
    assert "8f14e45f" not in everything
    assert "EXCEPTION_INFO" not in journal.entries[3]
    assert "LeakyError" in str(journal.entries[3]["EXCEPTION_TEXT"])
    assert journal.entries[3]["MESSAGE"].startswith("broker said no\nTraceback")  # type: ignore[union-attr]


def test_context_is_per_thread(journal: Journal) -> None:
    both_inside = threading.Barrier(2)

    def scan(task: str) -> None:
        with task_context(task_id=task, target=f"target-{task}"):
            both_inside.wait()
            log.info("scanning")
            both_inside.wait()

    threads = [threading.Thread(target=scan, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.info("main thread")
    tagged = sorted((entry["TASK_ID"], entry["TARGET"]) for entry in journal.entries if "TASK_ID" in entry)
    assert tagged == [("a", "target-a"), ("b", "target-b")]
    assert "TASK_ID" not in journal.entries[-1]


def test_context_does_not_leak_after_the_block(journal: Journal) -> None:
    with task_context(task_id="t-1", phase="ports_scan"):
        pass
    set_phase("service_scan")  # outside any task: ignored
    log.info("after")
    assert "PHASE" not in journal.entries[0]
    assert "TASK_ID" not in journal.entries[0]


# --- stderr path ----------------------------------------------------------------------------------------


def test_stderr_lines(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", instance="1", secrets=[SECRET], journal=False)
    with task_context(task_id="t-9", target="198.51.100.4", phase="ports_scan"):
        log.info("started with %s", SECRET)
    log.warning("plain")
    log.debug("hidden at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO "
        r"\[task=t-9 target=198\.51\.100\.4 phase=ports_scan\] started with \*\*\*",
        lines[0],
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING plain", lines[1])


def test_stderr_exception_text_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", instance="1", secrets=[TOKEN], journal=False)
    try:
        raise RuntimeError(f"401 for Authorization: Bearer {TOKEN}")
    except RuntimeError:
        log.exception("upload failed")
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert "RuntimeError: 401 for Authorization: Bearer ***" in err
    assert "8f14e45f" not in err


def test_handlers_added_by_others_only_see_redacted_records(caplog: pytest.LogCaptureFixture) -> None:
    setup_logging("INFO", instance="1", secrets=[SECRET], journal=False)
    with caplog.at_level(logging.INFO):
        log.info("password %s", SECRET)
    assert caplog.records[0].args == ()
    assert "s3cr3t" not in caplog.text


def test_a_bad_format_string_does_not_lose_the_record(journal: Journal) -> None:
    log.info("two %s %s", "only-one")  # noqa: PLE1206 -- the mistake under test
    assert "only-one" in str(journal.entries[0]["MESSAGE"])


def test_setup_twice_keeps_one_handler_and_quiets_libraries() -> None:
    setup_logging("INFO", instance="1", secrets=[], journal=False)
    assert logging.getLogger("kombu").level == logging.WARNING
    setup_logging("DEBUG", instance="1", secrets=[], journal=False)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_falcoria_worker", False)]
    assert len(ours) == 1
    assert logging.getLogger().level == logging.DEBUG
    assert all(logging.getLogger(name).level == logging.NOTSET for name in logs.NOISY_LOGGERS)


def test_secrets_of_an_earlier_setup_are_not_kept(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", instance="1", secrets=["first-secret"], journal=False)
    setup_logging("INFO", instance="1", secrets=["second-secret"], journal=False)
    log.info("first-secret second-secret")
    assert "first-secret ***" in capsys.readouterr().err


# --- journald detection ---------------------------------------------------------------------------------


def test_stderr_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream:
        stat = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, stream.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"}, stream.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, stream.fileno())
        assert not stderr_is_journal({}, stream.fileno())


def test_setup_detects_journald_from_journal_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    stat = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    sender = Journal()
    setup_logging("INFO", instance="1", secrets=[], journal_sender=sender)
    log.info("to the journal")
    assert [entry["MESSAGE"] for entry in sender.entries] == ["to the journal"]
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
    setup_logging("INFO", instance="1", secrets=[], journal_sender=sender)
    log.info("to stderr")
    assert len(sender.entries) == 1
