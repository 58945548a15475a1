"""The whole two-phase pipeline with real nmap against the test namespaces."""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path

import nmap
import pytest

from falcoria_worker import caps, merge
from falcoria_worker.errors import Cancelled, ScanFailed
from falcoria_worker.model import Phase, parse_task
from falcoria_worker.pipeline import Engine, Hooks, NoHooks
from falcoria_worker.policy import PolicyConfig
from falcoria_worker.scope import Scope
from tests.fakes.scanledger import check_report

pytestmark = pytest.mark.integration


def make_task(
    ip: str,
    ports_opts: str,
    service_opts: str = "-sV -Pn",
    *,
    timeout: int = 120,
    include_services: bool = True,
    hostnames: list[str] | None = None,
):
    return parse_task(
        {
            "ip": ip,
            "hostnames": hostnames or [],
            "project": {"__type__": "uuid", "__value__": {"hex": uuid.uuid4().hex}},
            "open_ports_opts": ports_opts,
            "service_opts": service_opts,
            "timeout": timeout,
            "include_services": include_services,
            "mode": "append",
            "user": {"id": str(uuid.uuid4()), "username": "admin"},
            "open_ports_str": ports_opts.rsplit("-p ", 1)[-1].replace(",", " "),
            "track_history": True,
        }
    )


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(
        nmap="/usr/bin/nmap",
        policy=PolicyConfig(),
        scope=Scope.from_strings(allow=["10.250.0.0/16", "127.0.0.0/8"]),
        raw=caps.raw_sockets(),
        stats_every="200ms",
        kill_grace=1.0,
    )


def nmap_own(ip: str, args: str, out: Path) -> nmap.PortScanner:
    """nmap's own view of the same scan, parsed by python-nmap: the oracle."""
    subprocess.run(["nmap", *args.split(), "-oX", str(out), ip], check=True, capture_output=True)
    scanner = nmap.PortScanner()
    scanner.analyse_nmap_xml_scan(out.read_text())
    return scanner


def test_two_phases_find_services_and_lose_nothing(engine: Engine, netns_lab, tmp_path: Path) -> None:
    target = netns_lab.services
    ports = ",".join(str(p) for p in [*sorted(target.ports), 9, 443])
    task = make_task(
        target.ip,
        f"-n --max-retries 1 -Pn -p {ports}",
        "-sV -sC --script-timeout 2s -Pn",
        hostnames=["svc.test"],
    )
    outcome = engine.execute(engine.prepare(task), tmp_path / "w", threading.Event())

    assert sorted(p for _proto, p in outcome.open_ports) == sorted(target.ports)
    assert outcome.report is not None
    assert check_report(outcome.report.read_bytes()) == [target.ip]  # what ScanLedger would import

    merged = nmap.PortScanner()
    merged.analyse_nmap_xml_scan(outcome.report.read_text())
    host = merged[target.ip]
    own = nmap_own(
        target.ip,
        f"-n -Pn -sV -sC --script-timeout 2s -p {','.join(map(str, target.ports))}",
        tmp_path / "own.xml",
    )
    for port, service in target.ports.items():
        assert host["tcp"][port]["state"] == "open"
        assert host["tcp"][port]["name"] == own[target.ip]["tcp"][port]["name"] == service
        assert (
            host["tcp"][port].get("script", {}).keys() == own[target.ip]["tcp"][port].get("script", {}).keys()
        )
    assert "svc.test" in [h["name"] for h in host["hostnames"]]
    # phase 1's truthful -p list (normalised: sorted, ranges merged) survives: ScanLedger's replace
    # mode derives not_shown_ports from it
    assert "-p 9,21-22,80,443 " in merged.command_line()
    assert host["tcp"][443]["state"] in ("closed", "filtered") or 443 not in host["tcp"]


def test_every_one_of_65535_open_ports_reaches_the_report(engine: Engine, netns_lab, tmp_path: Path) -> None:
    task = make_task(
        netns_lab.allopen.ip,
        "-n -Pn -p 1-65535",
        include_services=False,
        timeout=300,
    )
    outcome = engine.execute(engine.prepare(task), tmp_path / "w", threading.Event())
    # On a busy machine nmap may give up on a few probes of 65,535 (it reports them filtered): allowed.
    assert len(outcome.open_ports) >= 65535 - 20
    rows = merge.summary(outcome.report)
    assert len(rows) == 65535  # every port nmap reported is in the merged report
    assert sum(r.state == "open" for r in rows) == len(outcome.open_ports)
    check_report(outcome.report.read_bytes())


def test_thousands_of_open_ports_get_service_detection(engine: Engine, netns_lab, tmp_path: Path) -> None:
    # The upstream worker's stdout pipe blocks nmap from about 930 open ports with -sV.
    task = make_task(
        netns_lab.allopen.ip,
        "-n -Pn --max-retries 1 -p 20001-25000",
        "-sV --version-intensity 0 -Pn",
        timeout=300,
    )
    outcome = engine.execute(engine.prepare(task), tmp_path / "w", threading.Event())
    assert len(outcome.open_ports) == 5000
    assert outcome.notes == ()
    rows = merge.summary(outcome.report)
    assert len(rows) == 5000
    assert {r.service for r in rows} == {"ssh"}
    check_report(outcome.report.read_bytes())


def test_open_ports_timeout_fails_the_task(engine: Engine, netns_lab, tmp_path: Path) -> None:
    task = make_task(netns_lab.blackhole.ip, "-n -Pn --max-retries 10 -p 1-65535", timeout=1)
    with pytest.raises(ScanFailed, match="timed out after 1 s"):
        engine.execute(engine.prepare(task), tmp_path / "w", threading.Event())


def test_service_timeout_still_delivers_open_ports(engine: Engine, netns_lab, tmp_path: Path) -> None:
    target = netns_lab.services
    # -sV on the banner ports waits for probes far longer than 2 s; phase 1 takes milliseconds.
    task = make_task(target.ip, "-n -Pn -p 21,22,80", "-sV --version-all -Pn", timeout=2)
    outcome = engine.execute(engine.prepare(task), tmp_path / "w", threading.Event())
    assert outcome.notes and "service detection timed out after 2 s" in outcome.notes[0]
    assert sorted(p for _proto, p in outcome.open_ports) == [21, 22, 80]
    assert {r.portid for r in merge.summary(outcome.report)} >= {21, 22, 80}


class CancelAfterPhaseOne(NoHooks):
    def __init__(self, cancel: threading.Event) -> None:
        self.cancel = cancel
        self.phases: list[Phase] = []

    def phase(self, phase: Phase, detail: str) -> None:
        self.phases.append(phase)

    def nmap_finished(self, phase: Phase) -> None:
        if phase is Phase.PORTS:
            self.cancel.set()  # the cancel arrives after phase 1 and before phase 2


def test_cancel_between_phases_starts_no_phase_two(engine: Engine, netns_lab, tmp_path: Path) -> None:
    cancel = threading.Event()
    hooks = CancelAfterPhaseOne(cancel)
    task = make_task(netns_lab.services.ip, "-n -Pn -p 21,22,80")
    with pytest.raises(Cancelled, match="between the two phases"):
        engine.execute(engine.prepare(task), tmp_path / "w", cancel, hooks)
    assert hooks.phases == [Phase.PORTS]


class Recorder(NoHooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, Phase]] = []
        self.percents: list[float] = []

    def nmap_started(self, phase: Phase, proc) -> None:
        self.events.append(("start", phase))

    def nmap_finished(self, phase: Phase) -> None:
        self.events.append(("end", phase))

    def progress(self, phase: Phase, percent: float) -> None:
        self.percents.append(percent)


def test_hooks_see_both_phases_in_order(engine: Engine, netns_lab, tmp_path: Path) -> None:
    hooks: Hooks = Recorder()
    task = make_task(netns_lab.services.ip, "-n -Pn -p 21,22,80")
    engine.execute(engine.prepare(task), tmp_path / "w", threading.Event(), hooks)
    assert hooks.events == [
        ("start", Phase.PORTS),
        ("end", Phase.PORTS),
        ("start", Phase.SERVICES),
        ("end", Phase.SERVICES),
    ]
