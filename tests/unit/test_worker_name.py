"""The worker name: `<HOSTNAME>-<INSTANCE>` for an instance with a SOURCE_ADDRESS, the bare host name
otherwise, and the same name in the node name, `check`, `config`, drain and the registered address.
Redis keys and running entries: tests/integration/test_source_address.py."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from falcoria_worker import cli, config, drain
from falcoria_worker.checks import run_checks
from falcoria_worker.identity import Identity
from falcoria_worker.settings_io import describe, load
from falcoria_worker.worker_ip import current_ip

SOURCE = {"HOSTNAME": "scanner1", "INSTANCE": "2", "SOURCE_ADDRESS": "203.0.113.7"}


def test_without_source_address_the_name_is_the_host_name() -> None:
    s = config.parse({"HOSTNAME": "scanner1", "INSTANCE": "2"})
    assert s.hostname == s.machine_hostname == "scanner1"
    assert Identity.of(s).nodename == "worker2@scanner1"


def test_with_source_address_the_instance_has_a_name_of_its_own() -> None:
    s = config.parse(SOURCE)
    assert (s.hostname, s.machine_hostname) == ("scanner1-2", "scanner1")
    assert Identity.of(s).nodename == "worker2@scanner1-2"
    assert drain.node_name(s) == Identity.of(s).nodename
    assert next(run_checks(s))[2] == "loaded (instance 2, node worker2@scanner1-2)"


def test_a_configured_node_name_keeps_the_per_address_host_part() -> None:
    s = config.parse({**SOURCE, "NODE_NAME": "edge"})
    assert Identity.of(s).nodename == "edge@scanner1-2"


def test_registered_ip_is_worker_ip_then_source_address() -> None:
    s = config.parse(SOURCE)
    assert current_ip(s) == "203.0.113.7"
    assert current_ip(config.parse({**SOURCE, "WORKER_IP": "198.51.100.9"})) == "198.51.100.9"


def test_config_shows_the_name_and_why(tmp_path: Path) -> None:
    loaded = load(
        environ={"SOURCE_ADDRESS": "203.0.113.7", "HOSTNAME": "scanner1"}, etc_dir=tmp_path, instance="2"
    )
    shown = {key: (value, source) for key, value, source in describe(loaded)}
    assert shown["HOSTNAME"] == ("scanner1-2", "env, + -2 as SOURCE_ADDRESS is set")
    plain = load(environ={"HOSTNAME": "scanner1"}, etc_dir=tmp_path, instance="2")
    assert {key: value for key, value, _ in describe(plain)}["HOSTNAME"] == "scanner1"


def test_forget_host_is_refused_for_the_bare_host(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before Redis is asked: a bare host's own key is the one its instances refresh.
    s = config.parse({"HOSTNAME": "scanner1", "WORKER_IP": "192.0.2.1", "REDIS_PORT": "1"})
    assert cli._register_ip(argparse.Namespace(forget_host=True), s) == 1
    assert "bare host" in capsys.readouterr().err
