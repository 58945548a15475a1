"""The benchmarks' own logic that needs no lab: the sweep's port mix and plan, the bare run's shell
pipeline that turns phase 1's XML into phase 2's -p argument, and the figures."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import sweep, sweepnet
from bench.report import Options
from falcoria_worker.argv import compact_ports

PHASE1 = """<?xml version="1.0" encoding="UTF-8"?>
<nmaprun scanner="nmap" args="nmap" start="1" version="7.93" xmloutputversion="1.05">
<host starttime="1" endtime="2"><status state="up" reason="user-set" reason_ttl="0"/>
<address addr="10.250.4.1" addrtype="ipv4"/>
<ports><extraports state="closed" count="1019">
</extraports>
{ports}</ports>
</host>
</nmaprun>
"""


def _port(number: int, state: str) -> str:
    return (
        f'<port protocol="tcp" portid="{number}"><state state="{state}" reason="syn-ack" reason_ttl="64"/>'
        f'<service name="x" method="table" conf="3"/></port>\n'
    )


def test_port_mix_gives_every_address_one_to_five_of_the_services_the_same_in_every_run() -> None:
    addresses = [f"10.250.4.{i}" for i in range(256)]
    mix = sweepnet.port_mix(addresses)
    assert mix == sweepnet.port_mix(addresses)
    assert {len(ports) for ports in mix.values()} == {1, 2, 3, 4, 5}
    assert all(set(ports) <= set(sweepnet.SERVICES) and ports == sorted(ports) for ports in mix.values())


@pytest.mark.parametrize(
    "ports", [[22], [21, 22], [21, 22, 25, 110, 143], [25, 110, 143], [1, 2, 3, 7, 9, 10]]
)
def test_bare_phase2_gets_the_ports_argument_the_worker_builds(tmp_path: Path, ports: list[int]) -> None:
    xml = "".join(_port(p, "open") for p in ports) + _port(4000, "filtered")
    (tmp_path / "phase1.xml").write_text(PHASE1.format(ports=xml))
    out = subprocess.run(
        ["sh", "-c", f"d={tmp_path}; {sweep.OPEN_PORTS}"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == compact_ports(ports)


def test_bare_script_runs_the_two_phases_with_the_workers_options(tmp_path: Path) -> None:
    script = sweep.bare_script(tmp_path, "10.250.4.1")
    assert '-p 1-1024 -oX "$d/phase1.xml" --stats-every 2s -- "$1"' in script
    assert 'nmap -sV -Pn -p "$ports" -oX "$d/phase2.xml"' in script
    assert "10.250.4.1" not in script


def test_plan_gives_fewer_addresses_to_fewer_instances_unless_told() -> None:
    assert sweep.plan(Options()) == [(1, 256), (2, 512), (4, 1024), (8, 1024)]
    assert sweep.plan(Options(quick=True)) == [(1, sweep.QUICK_ADDRESSES)]
    assert sweep.plan(Options(addresses=128, instances=(1, 2))) == [(1, 128), (2, 128)]


def test_plots_are_png_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench import plots

    rounds = [
        sweep.Round(
            instances=n,
            addresses=16,
            publish_seconds=0.1,
            wall=10.0 / n,
            bare_wall=10.0 / n,
            latencies=[0.5 * i for i in range(1, 17)],
            worker_cpu=0.5,
            nmap_cpu=8.0,
            bare_cpu=8.0,
            peak_rss_kib=[43_000] * n,
            once=16,
            duplicated=0,
            missing=0,
            overheads=[0.02] * 16,
        )
        for n in (1, 2)
    ]
    paths = plots.sweep(rounds, tmp_path)
    assert len(paths) == 2
    for path in paths.values():
        assert path.parent == tmp_path and path.read_bytes().startswith(b"\x89PNG")
