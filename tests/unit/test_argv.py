"""argv.phase1_argv / phase2_argv / compact_ports: the exact nmap command lines, the target last after "--",
and port lists that always fit in one argument."""

from __future__ import annotations

import dataclasses

import pytest

from falcoria_worker.argv import MAX_PORT_ARG, compact_ports, phase1_argv, phase2_argv
from falcoria_worker.errors import Rejected
from falcoria_worker.model import ImportMode, Phase, ScanTask, TaskUser
from falcoria_worker.policy import check_options

TASK = ScanTask(
    ip="127.0.0.1",
    hostnames=("loopback.test",),
    project="a2783030-c0f7-4f4a-9b3e-1d2c3b4a5f60",
    open_ports_opts="-n --max-retries 1 -Pn -p 1,22,55432,56379,58000",
    service_opts="-sV -Pn",
    timeout=120,
    include_services=True,
    mode=ImportMode.APPEND,
    user=TaskUser(id="8ce86274-1b2a-4c5d-8e9f-0a1b2c3d4e5f", username="admin"),
    open_ports_str="1 22 55432 56379 58000",
    track_history=True,
)
IPV6_TASK = dataclasses.replace(TASK, ip="2001:db8::1")  # documentation range: built, never scanned
ALL_FLAGS = (
    "--max-retries 3 --min-rtt-timeout 100ms --max-rtt-timeout 3000ms --initial-rtt-timeout 500ms "
    "--min-rate 50 --max-rate 300 -A -sC -O -sV -Pn"
)
TAIL = ["-oX", "/run/w/out.xml", "--stats-every", "2s", "--", "127.0.0.1"]


def phase1(task: ScanTask, opts: str, *, privileged: bool = False) -> list[str]:
    return phase1_argv(
        task, check_options(opts, Phase.PORTS), nmap="nmap", privileged=privileged, xml_path="/run/w/out.xml"
    )


def phase2(task: ScanTask, opts: str, ports: list[tuple[str, int]], *, privileged: bool = False) -> list[str]:
    return phase2_argv(
        task,
        check_options(opts, Phase.SERVICES),
        ports,
        nmap="nmap",
        privileged=privileged,
        xml_path="/run/w/out.xml",
    )


def test_captured_message_phase1() -> None:
    assert phase1(TASK, TASK.open_ports_opts) == [
        "nmap", "-n", "--max-retries", "1", "-Pn", "-p", "1,22,55432,56379,58000", *TAIL,
    ]  # fmt: skip


def test_captured_message_phase2() -> None:
    ports = [("tcp", 55432), ("tcp", 56379), ("tcp", 58000)]
    assert phase2(TASK, TASK.service_opts, ports) == ["nmap", "-sV", "-Pn", "-p", "55432,56379,58000", *TAIL]


def test_all_flags_service_opts_phase2() -> None:
    assert phase2(TASK, ALL_FLAGS, [("tcp", 22), ("tcp", 80)]) == [
        "nmap", *ALL_FLAGS.split(), "-p", "22,80", *TAIL,
    ]  # fmt: skip


def test_top_ports_and_stats_every() -> None:
    argv = phase1_argv(
        TASK,
        check_options("-n -Pn --top-ports 1000 -p 1-2000", Phase.PORTS),
        nmap="/usr/bin/nmap",
        privileged=False,
        xml_path="/x.xml",
        stats_every="5s",
    )
    assert argv == [
        "/usr/bin/nmap", "-n", "-Pn", "-p", "1-2000", "--top-ports", "1000",
        "-oX", "/x.xml", "--stats-every", "5s", "--", "127.0.0.1",
    ]  # fmt: skip


def test_privileged_only_when_asked() -> None:
    assert "--privileged" not in phase1(TASK, "-sS -p 80")
    argv = phase1(TASK, "-sS -p 80", privileged=True)
    assert argv[-7:] == ["--privileged", *TAIL]
    assert argv.count("--privileged") == 1


def test_ipv6_target_gets_minus_6_once() -> None:
    argv = phase1(IPV6_TASK, "-n -p 80")
    assert argv == [
        "nmap",
        "-n",
        "-p",
        "80",
        "-6",
        "-oX",
        "/run/w/out.xml",
        "--stats-every",
        "2s",
        "--",
        "2001:db8::1",
    ]
    assert phase1(IPV6_TASK, "-6 -n -p 80").count("-6") == 1
    argv = phase2(IPV6_TASK, "-sV", [("tcp", 80)], privileged=True)
    assert argv[-8:-6] == ["-6", "--privileged"]
    assert argv[-1] == "2001:db8::1"


def test_minus_6_with_ipv4_target_is_refused() -> None:
    with pytest.raises(Rejected, match=r"'-6' refused: target 127\.0\.0\.1 is IPv4"):
        phase1(TASK, "-6 -p 80")


def test_phase2_prefixes_only_with_both_protocols() -> None:
    assert phase2(TASK, "-sV -sU -Pn", [("udp", 161), ("udp", 53)])[-8:-6] == ["-p", "53,161"]
    argv = phase2(TASK, "-sV -sS -sU -Pn", [("tcp", 443), ("udp", 53), ("tcp", 80), ("tcp", 81)])
    assert argv[-8:-6] == ["-p", "T:80-81,443,U:53"]


def test_phase2_adds_the_scan_types_its_ports_need() -> None:
    # UDP ports without -sU would be probed as TCP; TCP ports next to -sU alone would not be probed at all.
    assert phase2(TASK, "-sV", [("udp", 53)])[:3] == ["nmap", "-sV", "-sU"]
    assert phase2(TASK, "-sV", [("udp", 53), ("tcp", 22)])[:4] == ["nmap", "-sV", "-sU", "-sS"]
    assert phase2(TASK, "-sV -sU", [("tcp", 22)])[:4] == ["nmap", "-sV", "-sU", "-sS"]
    assert phase2(TASK, "-sV -sT -sU", [("udp", 53), ("tcp", 22)])[:5] == ["nmap", "-sV", "-sT", "-sU", "-p"]
    assert phase2(TASK, "-sV", [("tcp", 22)])[:3] == ["nmap", "-sV", "-p"]


def test_all_65535_ports_fit_in_one_argument() -> None:
    every = list(range(1, 65536))
    assert compact_ports(every) == "1-65535"
    assert compact_ports(reversed(every)) == "1-65535"
    assert phase2(TASK, "-sV", [("tcp", port) for port in every])[-8:-6] == ["-p", "1-65535"]
    both = [("tcp", port) for port in every] + [("udp", port) for port in every]
    assert phase2(TASK, "-sV -sS -sU", both)[-8:-6] == ["-p", "T:1-65535,U:1-65535"]


def test_every_other_port_is_bridged_below_the_argument_limit() -> None:
    # A hostile target can answer "open" on every odd port: written out, that is about 190 KB.
    odd = [("tcp", port) for port in range(1, 65536, 2)] + [("udp", port) for port in range(2, 65536, 2)]
    argv = phase2(TASK, "-sV -sS -sU", odd)
    expression = argv[argv.index("-p") + 1]
    assert len(expression) <= MAX_PORT_ARG < 128 * 1024
    assert "--open" in argv  # the bridged-in ports were not open; nmap must not report them
    tcp, udp = expression.removeprefix("T:").split(",U:")
    assert tcp.startswith("1-") and udp.startswith("2-")


def test_a_list_that_fits_is_not_bridged() -> None:
    ports = [("tcp", port) for port in range(1, 30000, 2)]
    argv = phase2(TASK, "-sV", ports)
    assert "--open" not in argv
    assert argv[argv.index("-p") + 1] == ",".join(str(port) for port in range(1, 30000, 2))


@pytest.mark.parametrize(
    ("ports", "expected"),
    [([], ""), ([80], "80"), ([1, 2, 3, 5], "1-3,5"), ([5, 3, 1, 2, 2], "1-3,5"), ([65535, 1], "1,65535")],
)
def test_compact_ports(ports: list[int], expected: str) -> None:
    assert compact_ports(ports) == expected


def test_compact_ports_bridge() -> None:
    assert compact_ports([1, 3, 10], bridge=1) == "1-3,10"
    assert compact_ports([1, 3, 10], bridge=6) == "1-10"


@pytest.mark.parametrize("ports", [[], [("sctp", 80)], [("tcp", 0)], [("udp", 65536)]])
def test_phase2_refuses_impossible_port_lists(ports: list[tuple[str, int]]) -> None:
    with pytest.raises(ValueError, match="port"):
        phase2(TASK, "-sV", ports)


def test_target_is_last_after_double_dash_and_nothing_else_is_a_target() -> None:
    argv = phase1(TASK, "-n -sS -T4 --max-retries 2 -p-")
    assert argv[-2:] == ["--", "127.0.0.1"]
    assert argv.count("--") == 1
    assert argv.count("127.0.0.1") == 1
