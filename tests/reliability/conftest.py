"""Fixtures of the reliability suite: the case's figures, the /proc watch, and the secrets check that
runs after every case (case 8 of docs/reliability.md). The figures are printed at the end of the run; with
FW_RELIABILITY_REPORT=<file> they are also appended to that file as JSON lines (docs/reliability.md is
written from them)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.reliability.kit import Figures, ProcessWatch, secret_exposures

FIGURES: list[Figures] = []


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    record = Figures(case=request.node.name)
    started = time.monotonic()
    yield record
    record.seconds = round(time.monotonic() - started, 1)
    FIGURES.append(record)
    target = os.environ.get("FW_RELIABILITY_REPORT")
    if target:
        with Path(target).open("a") as out:
            out.write(json.dumps({**asdict(record), "faults": dict(record.faults)}) + "\n")


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[ProcessWatch]:
    sampler = ProcessWatch(tmp_path)
    sampler.start()
    yield sampler
    sampler.stop()


@pytest.fixture(autouse=True)
def no_secret_anywhere(
    request: pytest.FixtureRequest, redis_server, rabbitmq, tmp_path: Path
) -> Iterator[None]:
    """Case 8 across every case: the token and both passwords appear in no worker log, no Redis value, no
    process argument and no file name of the state dirs (spool included). The ScanLedger token is read
    from the case's ledger fixture when it has one."""
    yield
    secrets = {"REDIS_PASS": redis_server.password, "RABBITMQ_PASSWORD": rabbitmq.password}
    ledger = request.node.funcargs.get("scanledger")
    if ledger is not None and ledger.token:
        secrets["WORKER_BACKEND_TOKEN"] = ledger.token
    sampler = request.node.funcargs.get("watch")
    with redis_server.client() as r:
        found = secret_exposures(
            secrets,
            logs=sorted(tmp_path.glob("worker-*.log")),
            r=r,
            argvs=sampler.argvs if sampler is not None else (),
            dirs=sorted(tmp_path.glob("state-*")),
        )
    assert found == [], found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(
        f"{'case':58} {'runs':>4} {'tasks':>5} {'lost':>4} {'dup':>3} {'leak':>4} {'par':>3} {'s':>6}  faults"
    )
    for f in FIGURES:
        terminalreporter.write_line(
            f"{f.case[:58]:58} {f.runs:4} {f.tasks:5} {f.lost:4} {f.duplicated:3} {f.leaked_keys:4} "
            f"{f.parallel_runs:3} {f.seconds:6.1f}  {f.fault_text()}  {'; '.join(f.notes)}"
        )
