"""Smoke runs of the fleet-scale benchmarks through their own code (bench/): a 16-address sweep with one
instance against bare nmap, a 10 s idle sample, the tracking wait with one task per delay, and a 25 s
soak of two instances with two faults.

They keep the benchmarks' code paths working; what they assert is that every report was uploaded exactly
once and that each figure was produced, never how fast anything was (timing targets live in bench/).
"""

from __future__ import annotations

import math
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from bench import idle, soak, sweep, tracking
from bench.lab import Lab
from bench.report import Options
from tests.support import netns

pytestmark = pytest.mark.integration

SWEEP_ADDRESSES = 16


@pytest.fixture(scope="module")
def bench_lab() -> Iterator[Lab]:
    reason = netns._skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("nmap") is None:
        pytest.skip("nmap is not installed")
    with Lab() as started:
        yield started


@pytest.fixture
def lab(bench_lab: Lab) -> Iterator[Lab]:
    """The module's lab, reset after the test: no worker, empty Redis, vhost and ScanLedger."""
    yield bench_lab
    bench_lab.reset()


def _open_ports(xml: bytes) -> dict[int, str]:
    """Open port -> how nmap named its service ("probed": -sV matched it; "table": by number only)."""
    host = ET.fromstring(xml).find("host")  # noqa: S314 - the worker's report of our own nmap's output
    assert host is not None
    found = {}
    for port in host.iter("port"):
        state, service = port.find("state"), port.find("service")
        if state is not None and state.get("state") == "open":
            found[int(port.get("portid", "0"))] = "" if service is None else service.get("method", "")
    return found


def test_sweep_uploads_every_address_once_and_produces_every_figure(lab: Lab) -> None:
    targets = lab.sweep()
    addresses = targets.addresses[:SWEEP_ADDRESSES]
    result_round = sweep.run_round(lab, 1, addresses)

    assert (result_round.once, result_round.duplicated, result_round.missing) == (SWEEP_ADDRESSES, 0, 0)
    uploads = lab.ledger.uploads
    assert len(uploads) == SWEEP_ADDRESSES
    for upload in uploads:
        (ip,) = upload.ips
        # Phase 1 found the address's own ports, and -sV named each from its banner.
        services = _open_ports(upload.xml)
        assert sorted(services) == targets.open_ports[ip]
        assert set(services.values()) == {"probed"}, services
    assert len(result_round.latencies) == SWEEP_ADDRESSES
    assert all(latency > 0 for latency in result_round.latencies)
    assert result_round.wall > 0 and result_round.bare_wall > 0
    assert result_round.worker_cpu >= 0 and result_round.nmap_cpu > 0 and result_round.bare_cpu > 0
    assert len(result_round.peak_rss_kib) == 1 and result_round.peak_rss_kib[0] > 0
    assert len(result_round.overheads) == SWEEP_ADDRESSES
    assert not math.isnan(result_round.first) and not math.isnan(result_round.last)

    result = sweep.report([result_round], targets.network, Options(quick=True))
    assert len(result.rows) == 1 and len(result.rows[0]) == len(result.headers)
    assert "exactly once" in result.markdown()


def test_idle_sample_produces_every_figure(lab: Lab) -> None:
    result = idle.run(lab, Options(quick=True, seconds=10))

    figures = dict(result.rows)
    assert figures["CPU, % of one core"].endswith("in 10 s)")
    assert float(figures["wake-ups per second (context switches, all threads)"]) >= 0
    assert float(figures["resident memory (VmRSS)"].removesuffix(" MiB")) > 0
    assert len(result.goals) == 4


def test_tracking_wait_counts_the_commands_of_every_task(lab: Lab) -> None:
    result = tracking.run(lab, Options(quick=True))

    assert [row[0] for row in result.rows] == [f"{d:g} s" for d in tracking.DELAYS]
    for row in result.rows:
        assert int(row[2]) > 0  # the task's own commands were seen, whatever the delay
    assert len(lab.ledger.uploads) == 1 + len(tracking.DELAYS)  # the warm-up and one per delay


def test_soak_accounts_for_every_task_and_produces_every_figure(lab: Lab) -> None:
    outcome = soak.soak(
        lab, seconds=25, every=10, instances=2, kinds=("SIGKILL instance", "ScanLedger outage")
    )
    result = soak.report(outcome)

    figures = outcome.figures
    assert sum(figures.faults.values()) == 2
    assert figures.tasks > 0
    assert (figures.lost, figures.duplicated, figures.parallel_runs, figures.leaked_keys) == (0, 0, 0, 0)
    assert outcome.notes == []
    # A series per process (a SIGKILLed instance comes back as a new one) and one of Redis keys, each
    # with samples of every instance and of Redis.
    assert len(result.rows) == len(outcome.series) + 1
    assert {instance for instance, _pid in outcome.series} == {"1", "2"}
    assert int(result.rows[-1][1]) > 0
    assert [text for text, _measured, _met in result.goals][:2] == [
        "every task accounted for exactly once",
        "no Redis key leaked after the instances settle",
    ]
    assert all(met for _text, _measured, met in result.goals[:2])
    assert f"seed {outcome.seed}" in result.markdown()
