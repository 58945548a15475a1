"""The command line as an operator uses it: scan, check, config, register-ip (real nmap and services)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.scanledger import check_report

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, "-m", "falcoria_worker", *args],
        env={**base, **(env or {})},
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def peer_env(redis_server, rabbitmq, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "RABBITMQ_HOST": rabbitmq.host,
        "RABBITMQ_PORT": str(rabbitmq.port),
        "RABBITMQ_USER": rabbitmq.user,
        "RABBITMQ_VHOST": rabbitmq.vhost,
        "RABBITMQ_PASSWORD": rabbitmq.password,
        "REDIS_HOST": redis_server.host,
        "REDIS_PORT": str(redis_server.port),
        "REDIS_PASS": redis_server.password,
        "STATE_DIR": str(tmp_path),
        **extra,
    }


def test_scan_prints_the_table_and_writes_an_importable_report(netns_lab, tmp_path: Path) -> None:
    target = netns_lab.services
    out = tmp_path / "report.xml"
    proc = cli(
        "scan",
        target.ip,
        "--allow",
        "10.250.0.0/16",
        "-p",
        "21,22,80,443",
        "--hostname",
        "svc.test",
        "-o",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["PORT", "STATE", "SERVICE", "PRODUCT", "VERSION"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["22/tcp"][1:4] == ["open", "ssh", "OpenSSH"]
    assert rows["80/tcp"][1:3] == ["open", "http"]
    assert rows["443/tcp"][1] == "closed"
    assert check_report(out.read_bytes()) == [target.ip]


def test_scan_refuses_hostile_options_without_starting_nmap(tmp_path: Path) -> None:
    proc = cli("scan", "127.0.0.1", "--allow", "127.0.0.1/32", "--ports-opts", "-Pn -iL /etc/shadow")
    assert proc.returncode == 2
    assert "refused" in proc.stderr and "-iL" in proc.stderr


def test_scan_refuses_a_target_out_of_scope(tmp_path: Path) -> None:
    proc = cli("scan", "127.0.0.1", "-p", "22")
    assert proc.returncode == 2
    assert "loopback" in proc.stderr


def test_check_reports_each_peer(redis_server, rabbitmq, tmp_path: Path) -> None:
    env = peer_env(redis_server, rabbitmq, tmp_path)
    good = cli("check", env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    names = [line.split(":")[0] for line in good.stdout.splitlines()]
    assert names == [
        "ok   config",
        "ok   nmap",
        "ok   raw sockets",
        "ok   source address",
        "ok   state dir",
        "ok   redis",
        "ok   rabbitmq",
        "ok   scanledger",
    ]
    # Outside systemd nothing has created STATE_DIR yet: `run` would, so that is a warning, not a failure.
    fresh = tmp_path / "fresh" / "1"
    first = cli("check", env={**env, "STATE_DIR": str(fresh)})
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"WARN state dir: {fresh} does not exist yet: `run` will create it" in first.stdout.splitlines()
    bad = cli("check", env={**env, "REDIS_PASS": "wrong-password", "RABBITMQ_PORT": "1"})
    assert bad.returncode == 1
    failed = {line.split(":")[0].split()[1] for line in bad.stdout.splitlines() if line.startswith("FAIL")}
    assert failed == {"redis", "rabbitmq"}
    assert "wrong-password" not in bad.stdout + bad.stderr


def test_config_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    conf = tmp_path / "extra.conf"
    conf.write_text("RABBITMQ_HOST=broker.example.test\nREDIS_PASS=redis-secret-value\n")
    proc = cli("config", "--config", str(conf), env={"WORKER_BACKEND_TOKEN": "token-secret-value"})
    assert proc.returncode == 0, proc.stderr
    assert "redis-secret-value" not in proc.stdout and "token-secret-value" not in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RABBITMQ_HOST"))
    assert "broker.example.test" in line and f"{conf}:1" in line


def test_bad_setting_stops_start_up_naming_key_and_fix() -> None:
    proc = cli("run", env={"RABBITMQ_HOST": "broker.example.test", "RABBITMQ_PORT": "seventy"})
    assert proc.returncode == 2
    assert "RABBITMQ_PORT" in proc.stderr and "1 and 65535" in proc.stderr


def test_register_ip_writes_the_worker_key(redis_server, rabbitmq, tmp_path: Path) -> None:
    env = peer_env(redis_server, rabbitmq, tmp_path, HOSTNAME="fwtest-cli", WORKER_IP="203.0.113.9")
    proc = cli("register-ip", env=env)
    assert proc.returncode == 0, proc.stderr
    assert redis_server.client().hget("worker:fwtest-cli", "ip") == "203.0.113.9"


def test_an_instance_with_a_source_address_registers_it_under_its_own_name(
    redis_server, rabbitmq, tmp_path: Path
) -> None:
    client = redis_server.client()
    client.hset("worker:fwtest-src", mapping={"ip": "192.0.2.1"})
    env = peer_env(redis_server, rabbitmq, tmp_path, HOSTNAME="fwtest-src", SOURCE_ADDRESS="203.0.113.7")
    first = cli("register-ip", "--instance", "2", "--forget-host", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "worker:fwtest-src-2 ip=203.0.113.7\nworker:fwtest-src deleted\n"
    assert client.hget("worker:fwtest-src-2", "ip") == "203.0.113.7"
    assert not client.exists("worker:fwtest-src")
    again = cli("register-ip", "--instance", "2", "--forget-host", env=env)
    assert (again.returncode, again.stdout) == (0, "worker:fwtest-src-2 ip=203.0.113.7\n")
    shown = cli("config", "--instance", "2", env=env).stdout
    assert "HOSTNAME" in shown and "= fwtest-src-2    # env, + -2 as SOURCE_ADDRESS is set" in shown
    client.delete("worker:fwtest-src-2")
