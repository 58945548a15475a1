"""Fixtures of the system layer: a booted Debian container (harness.py), the .deb, and Redis and
RabbitMQ on the host's bridge address where the container can reach them.

    system_container  (session)  harness.Container, booted once; skipped without root or nspawn
    falcoria_deb      (session)  path of the .deb: $FALCORIA_WORKER_DEB, else built once by
                                 scripts/build-deb --dist harness.SUITE
    bridge_services   (session)  (RedisServer, RabbitMQ) bound to 127.0.0.1 and the bridge address

The release is Debian 12 (bookworm) unless FALCORIA_SYSTEST_DIST=trixie selects Debian 13: one release
per session, because the sessions of a machine are serialised and a second release costs only a few
minutes as a separate run (CI runs both).

The times of the expensive steps (TIMINGS, seconds) and other measurements (FACTS, unit in the name) are
printed at the end of the run.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import RabbitMQ, RedisServer
from tests.system import harness

TIMINGS: dict[str, float] = {}
FACTS: dict[str, float] = {}


@pytest.fixture(scope="session")
def system_container() -> Iterator[harness.Container]:
    reason = harness.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    with harness.session_lock(), harness.booted(timings=TIMINGS) as container:
        yield container


@pytest.fixture(scope="session")
def falcoria_deb() -> Path:
    given = os.environ.get("FALCORIA_WORKER_DEB")
    if given:
        return Path(given)
    started = time.monotonic()
    proc = subprocess.run(
        [str(harness.REPO / "scripts/build-deb"), "--dist", harness.SUITE],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/build-deb failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    TIMINGS["deb build + lintian"] = time.monotonic() - started
    deb = Path(proc.stdout.strip().splitlines()[-1])
    FACTS["deb size (MB)"] = deb.stat().st_size / 1e6
    return deb


@pytest.fixture(scope="session")
def bridge_services(
    services_run_dir: Path, system_container: harness.Container
) -> Iterator[tuple[RedisServer, RabbitMQ]]:
    """Redis and RabbitMQ for the workers in the container; the bridge exists once the container is up."""
    bind = ("127.0.0.1", system_container.lab.host_ip)
    redis_server = RedisServer.launch(services_run_dir, bind=bind)
    try:
        broker = RabbitMQ.launch(services_run_dir, bind=bind)
    except BaseException:
        redis_server.stop()
        raise
    try:
        yield redis_server, broker
    finally:
        broker.close()
        redis_server.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS or FACTS:
        terminalreporter.section(f"system test timings ({harness.SUITE})")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:45} {seconds:8.2f} s")
        for name, value in FACTS.items():
            terminalreporter.write_line(f"{name:45} {value:8.2f}")
