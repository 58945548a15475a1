"""SOURCE_ADDRESS: the setting, where -S/-e land in argv (after the policy, which keeps refusing both in
a task's options), the refusal of a task of the other address family, and the host-address check."""

from __future__ import annotations

import dataclasses

import pytest

from falcoria_worker import config, source
from falcoria_worker.argv import Source, phase1_argv, phase2_argv
from falcoria_worker.caps import RawSockets
from falcoria_worker.errors import ConfigError, Rejected
from falcoria_worker.model import Phase
from falcoria_worker.pipeline import Engine
from falcoria_worker.policy import PolicyConfig, check_options
from falcoria_worker.scope import Scope
from tests.unit.test_argv import IPV6_TASK, TASK

V4 = Source("203.0.113.7", 4)
V4_ON_LO = Source("203.0.113.8", 4, "eth0")
TAIL = ["-oX", "/w/x.xml", "--stats-every", "2s", "--", "127.0.0.1"]


def test_setting_parses_and_refuses_what_cannot_be_a_source() -> None:
    assert config.parse({"HOSTNAME": "h"}).source_address is None
    assert (
        config.parse({"HOSTNAME": "h", "SOURCE_ADDRESS": " 2001:DB8::0:7 "}).source_address == "2001:db8::7"
    )
    for bad in ("203.0.113", "0.0.0.0", "::", "127.0.0.1", "224.0.0.1", "eth0"):
        with pytest.raises(ConfigError, match="SOURCE_ADDRESS"):
            config.parse({"HOSTNAME": "h", "SOURCE_ADDRESS": bad})


def test_source_args_come_after_the_options_and_before_the_target() -> None:
    opts = check_options("-n -Pn -sS", Phase.PORTS)
    argv = phase1_argv(TASK, opts, nmap="nmap", privileged=True, xml_path="/w/x.xml", source=V4)
    assert argv == ["nmap", "-n", "-Pn", "-sS", "--privileged", "-S", "203.0.113.7", *TAIL]
    argv = phase2_argv(
        TASK, check_options("-sV", Phase.SERVICES), [("tcp", 22)], nmap="nmap", privileged=False,
        xml_path="/w/x.xml", source=V4_ON_LO,
    )  # fmt: skip
    assert argv == ["nmap", "-sV", "-p", "22", "-S", "203.0.113.8", "-e", "eth0", *TAIL]


def test_no_source_no_flags() -> None:
    argv = phase1_argv(
        TASK, check_options("-n", Phase.PORTS), nmap="nmap", privileged=False, xml_path="/w/x.xml"
    )
    assert "-S" not in argv and "-e" not in argv


@pytest.mark.parametrize("options", ["-S 203.0.113.9", "-e eth1", "-n -e eth0 -S 10.0.0.1"])
def test_the_policy_still_refuses_S_and_e_in_a_task(options: str) -> None:
    with pytest.raises(Rejected):
        check_options(options, Phase.PORTS)


def engine(src: Source | None) -> Engine:
    return Engine(
        nmap="nmap", policy=PolicyConfig(), scope=Scope.from_strings(allow=["0.0.0.0/0", "::/0"]),
        raw=RawSockets.CAP_NET_RAW, source=src,
    )  # fmt: skip


def test_a_task_of_the_other_family_is_refused_with_the_reason() -> None:
    with pytest.raises(
        Rejected, match=r"scans from the IPv4 address 203\.0\.113\.7 \(SOURCE_ADDRESS\)"
    ) as exc:
        engine(V4).prepare(dataclasses.replace(IPV6_TASK, open_ports_opts="-n", service_opts="-sV"))
    assert exc.value.field == "ip"
    v6 = Source("2001:db8::7", 6)
    with pytest.raises(Rejected, match="IPv6 address"):
        engine(v6).prepare(dataclasses.replace(TASK, ip="192.0.2.1"))
    assert engine(V4).prepare(dataclasses.replace(TASK, ip="192.0.2.1")).task.ip == "192.0.2.1"


def test_an_address_not_on_this_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"192\.0\.2\.77 is not an address of this host"):
        source.resolve("192.0.2.77")


def test_describe() -> None:
    assert "finds its interface itself" in source.describe(V4)
    assert "-e eth0" in source.describe(V4_ON_LO)
