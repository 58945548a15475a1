"""TLS in the suite: RABBITMQ_SSL and REDIS_SSL against real TLS listeners the test starts, with a private CA
made here and trusted only through SSL_CERT_FILE.

- A scan end to end with host names checked (the servers' certificates name `localhost`).
- An untrusted CA and a wrong host name (the certificate does not name 127.0.0.1) are each refused by
  `check` and by `run`, with a message naming the certificate problem; `run` does not exit into a restart
  loop: it keeps retrying, says why in STATUS, takes no task and stops cleanly.
- Listeners that require a client certificate: the worker presents RABBITMQ_SSL_CERTFILE/REDIS_SSL_CERTFILE
  with the keys handed over as systemd credentials; without them it is refused, naming the certificate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.kit import Figures, Run, leaked_keys, wait_clean
from tests.support.drive import scan_fields, wait_until
from tests.support.services import RabbitMQ, RedisServer
from tests.support.tasker import Tasker
from tests.support.tls import Certificate, PrivateCA, ServerTLS
from tests.support.workerproc import REPO_ROOT

pytestmark = pytest.mark.reliability

TASKS = 3
# What OpenSSL says when it refuses a peer's certificate, whichever side refused it.
CERTIFICATE_PROBLEM = ("certificate verify failed", "certificate required", "client certificate")


@dataclass
class TlsPair:
    redis: RedisServer
    broker: RabbitMQ

    def close(self) -> None:
        self.broker.close()
        self.redis.stop()


@dataclass
class TlsLab:
    ca: PrivateCA
    stranger: PrivateCA  # a CA nobody in the test trusts
    client: Certificate
    open_pair: TlsPair  # TLS, no client certificate asked for
    strict_pair: TlsPair  # TLS, a client certificate required


@pytest.fixture(scope="module")
def tls_lab(services_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsLab]:
    certs = tmp_path_factory.mktemp("tls")
    ca = PrivateCA.create(certs / "ca", "falcoria-test-ca")
    stranger = PrivateCA.create(certs / "stranger", "stranger-ca")
    server = ca.issue("services", dns=("localhost",))
    client = ca.issue("worker-client", client=True)
    pairs: list[TlsPair] = []
    try:
        for required in (False, True):
            tls = ServerTLS(ca.cert, server.cert, server.key, require_client_cert=required)
            redis_server = RedisServer.launch(services_run_dir, tls=tls)
            try:
                broker = RabbitMQ.launch(services_run_dir, tls=tls)
            except BaseException:
                redis_server.stop()
                raise
            pairs.append(TlsPair(redis_server, broker))
        yield TlsLab(ca, stranger, client, pairs[0], pairs[1])
    finally:
        for pair in pairs:
            pair.close()


@pytest.fixture
def pair_tasker(request: pytest.FixtureRequest, tls_lab: TlsLab) -> Iterator[tuple[TlsPair, Tasker]]:
    """Tasker on the plain ports of the pair the test names (open or strict), on an empty vhost and db."""
    pair = tls_lab.strict_pair if getattr(request, "param", "open") == "strict" else tls_lab.open_pair
    pair.broker.reset_vhost()
    pair.redis.flush()
    stand_in = Tasker(pair.broker, pair.redis.client())
    yield pair, stand_in
    stand_in.close()


def tls_env(
    pair: TlsPair, ca: Path, *, host: str = "localhost", tls: tuple[str, ...] = ("redis", "rabbitmq")
) -> dict[str, str]:
    """Settings reaching the pair: over TLS (to `host`, trusting `ca`) for the services in `tls`, over
    the plain port for the others."""
    redis_tls, broker_tls = "redis" in tls, "rabbitmq" in tls
    return {
        "SSL_CERT_FILE": str(ca),
        "REDIS_HOST": host if redis_tls else pair.redis.host,
        "REDIS_PORT": str(pair.redis.tls_port if redis_tls else pair.redis.port),
        "REDIS_PASS": pair.redis.password,
        "REDIS_SSL": str(redis_tls).lower(),
        "RABBITMQ_HOST": host if broker_tls else pair.broker.host,
        "RABBITMQ_PORT": str(pair.broker.tls_port if broker_tls else pair.broker.port),
        "RABBITMQ_USER": pair.broker.user,
        "RABBITMQ_PASSWORD": pair.broker.password,
        "RABBITMQ_VHOST": pair.broker.vhost,
        "RABBITMQ_SSL": str(broker_tls).lower(),
    }


def client_cert_env(client: Certificate, credentials: Path) -> dict[str, str]:
    """The client certificate by path, its key as a systemd credential (as the unit's LoadCredential=
    hands it over, under the prefix of the credential directory's ID)."""
    credentials.mkdir(exist_ok=True)
    for service in ("redis", "rabbitmq"):
        key = credentials / f"falcoria-worker_{service}_ssl_keyfile"
        key.write_bytes(client.key.read_bytes())
        key.chmod(0o400)
    return {
        "CREDENTIALS_DIRECTORY": str(credentials),
        "REDIS_SSL_CERTFILE": str(client.cert),
        "RABBITMQ_SSL_CERTFILE": str(client.cert),
    }


def check(env: dict[str, str], state_dir: Path) -> subprocess.CompletedProcess[str]:
    state_dir.mkdir(exist_ok=True)
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO_ROOT), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, "-m", "falcoria_worker", "check"],
        env={**base, **env, "STATE_DIR": str(state_dir)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check_lines(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """{peer: its line} of `falcoria-worker check`'s output."""
    lines = {}
    for line in done.stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        lines[rest.strip().split(":")[0]] = f"{verdict} {rest.strip()}"
    return lines


def names_certificate_problem(text: str) -> bool:
    return any(problem in text.lower() for problem in CERTIFICATE_PROBLEM)


def _scan_over_tls(
    pair: TlsPair,
    tasker: Tasker,
    worker_factory,
    scanledger,
    netns_lab,
    figures: Figures,
    env: dict[str, str],
    check_dir: Path,
) -> None:
    done = check(env, check_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = check_lines(done)
    assert lines["redis"].startswith("ok") and lines["rabbitmq"].startswith("ok"), lines
    worker = worker_factory("1", ledger=scanledger, **env).start()
    run = Run(tasker, scanledger, pair.redis)
    for _ in range(TASKS):
        run.send(scan_fields(netns_lab.services, "21,22,80"))
    run.wait_delivered(timeout=120)
    wait_clean(tasker, pair.redis.client())
    run.settle(figures)
    assert {s["state"] for s in run.states().values()} == {"completed"}
    assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
    assert leaked_keys(tasker, pair.redis.client()) == []
    assert worker.alive() and "Traceback" not in worker.log()
    assert worker.stop() == 0


def test_scan_end_to_end_over_tls_with_host_names_checked(
    tls_lab: TlsLab, pair_tasker, worker_factory, scanledger, netns_lab, tmp_path: Path, figures: Figures
) -> None:
    pair, tasker = pair_tasker
    env = tls_env(pair, tls_lab.ca.cert)
    _scan_over_tls(pair, tasker, worker_factory, scanledger, netns_lab, figures, env, tmp_path / "check")
    figures.notes.append("RabbitMQ and Redis over TLS, host name localhost checked")


@pytest.mark.parametrize("pair_tasker", ["strict"], indirect=True)
def test_listeners_requiring_a_client_certificate(
    tls_lab: TlsLab, pair_tasker, worker_factory, scanledger, netns_lab, tmp_path: Path, figures: Figures
) -> None:
    pair, tasker = pair_tasker
    env = tls_env(pair, tls_lab.ca.cert)
    refused = check(env, tmp_path / "check")
    assert refused.returncode == 1
    lines = check_lines(refused)
    for peer in ("redis", "rabbitmq"):
        assert lines[peer].startswith("FAIL") and names_certificate_problem(lines[peer]), lines
    figures.faults["no client certificate offered (check refused)"] += 1
    env |= client_cert_env(tls_lab.client, tmp_path / "credentials")
    _scan_over_tls(pair, tasker, worker_factory, scanledger, netns_lab, figures, env, tmp_path / "check")
    figures.notes.append("client certificate required by both; keys as systemd credentials")


@pytest.mark.parametrize("service", ["rabbitmq", "redis"])
@pytest.mark.parametrize("problem", ["untrusted CA", "wrong host name"])
def test_certificate_problem_refused_by_check_and_run_without_a_restart_loop(
    tls_lab: TlsLab,
    pair_tasker,
    worker_factory,
    scanledger,
    netns_lab,
    tmp_path: Path,
    figures: Figures,
    service: str,
    problem: str,
) -> None:
    pair, tasker = pair_tasker
    if problem == "untrusted CA":
        env = tls_env(pair, tls_lab.stranger.cert, tls=(service,))
    else:  # the certificate names localhost, not the address
        env = tls_env(pair, tls_lab.ca.cert, host="127.0.0.1", tls=(service,))
    done = check(env, tmp_path / "check")
    assert done.returncode == 1, done.stdout
    lines = check_lines(done)
    other = "redis" if service == "rabbitmq" else "rabbitmq"
    assert lines[other].startswith("ok"), lines
    assert lines[service].startswith("FAIL") and names_certificate_problem(lines[service]), lines
    expected = "certificate verify failed"
    if problem == "wrong host name":
        expected = "mismatch"
    assert expected in lines[service].lower(), lines[service]

    run = Run(tasker, scanledger, pair.redis)
    task_id = run.send(scan_fields(netns_lab.services, "80"))
    # A watchdog as the unit's WatchdogSec= would set it, to see the loop keep feeding it.
    worker = worker_factory("1", ledger=scanledger, WATCHDOG_USEC="4000000", **env).start(wait_ready=False)
    # It says why it cannot work, and keeps trying in place (its log shows each attempt refused, its
    # watchdog stays fed) rather than exit and be restarted by systemd into the same refusal.
    worker.notify.wait_for(lambda line: line.startswith("STATUS=") and names_certificate_problem(line))
    wait_until(
        lambda: sum(names_certificate_problem(line) for line in worker.log().splitlines()) >= 3,
        timeout=60,
        what="three attempts refused",
    )
    fed = len([line for line in worker.notify.lines() if line == "WATCHDOG=1"])
    wait_until(
        lambda: len([line for line in worker.notify.lines() if line == "WATCHDOG=1"]) > fed,
        timeout=30,
        what="the watchdog still fed",
    )
    figures.faults[f"{problem} ({service})"] += 1
    assert worker.alive()
    assert "READY=1" not in worker.notify.lines()
    assert run.states()[task_id].get("state") not in {"running", "completed", "failed"}
    assert worker.stop() == 0
    assert "Traceback" not in worker.log()
    figures.tasks += 1  # the task waits, untouched, for an instance that can take it
