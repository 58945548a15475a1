"""The Ansible role over ssh against two booted machines, Debian 12 and Debian 13 (fleet.py), with Redis and
RabbitMQ on the host: a first rollout, a second run that changes nothing, a dry run, a config change that
restarts only the instances, scaling down, a canary with wrong broker settings that stops the rollout, and
an install from the fleet's signed apt repository (scripts/make-repo) served on the bridge.

One scenario in order: each test starts from the state the previous one left.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.drive import status
from tests.support.services import RabbitMQ, RedisServer, service_pair
from tests.support.tasker import Tasker
from tests.system import fleet as fleet_mod
from tests.system import harness
from tests.system.conftest import FACTS, TIMINGS, deb_for, repacked

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

CANARY, SECOND = fleet_mod.MACHINES  # inventory order: the first host is the canary batch
NAT_IP = f"{fleet_mod.SUBNET}.212"  # SECOND's "public" address, registered instead of its own (NAT)
INSTANCES = 2


@pytest.fixture(scope="module")
def fleet() -> Iterator[fleet_mod.Fleet]:
    reason = harness.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    with fleet_mod.booted_fleet(TIMINGS) as booted:
        yield booted


@pytest.fixture(scope="module")
def services(services_run_dir: Path, fleet: fleet_mod.Fleet) -> Iterator[tuple[RedisServer, RabbitMQ]]:
    """Redis and RabbitMQ on the fleet's bridge address (it exists once the fleet is up)."""
    with service_pair(services_run_dir, ("127.0.0.1", fleet.host_ip)) as pair:
        yield pair


@pytest.fixture(scope="module")
def config(
    services: tuple[RedisServer, RabbitMQ], fleet: fleet_mod.Fleet, falcoria_deb: Path
) -> dict[str, object]:
    """The group's variables for a working fleet (each test derives its own from a copy)."""
    redis_server, broker = services
    return {
        "falcoria_worker_deb": str(falcoria_deb),
        "falcoria_worker_instances": INSTANCES,
        "falcoria_worker_rabbitmq_host": fleet.host_ip,
        "falcoria_worker_rabbitmq_port": broker.port,
        "falcoria_worker_rabbitmq_user": broker.user,
        "falcoria_worker_rabbitmq_vhost": broker.vhost,
        "falcoria_worker_rabbitmq_password": broker.password,
        "falcoria_worker_redis_host": fleet.host_ip,
        "falcoria_worker_redis_port": redis_server.port,
        "falcoria_worker_redis_db": redis_server.db,
        "falcoria_worker_redis_pass": redis_server.password,
        # Short enough for the failing canary below; a working instance is READY within seconds.
        "falcoria_worker_ready_timeout": 30,
        "falcoria_worker_instance_settings": {"2": {"CONCURRENCY": 3}},
    }


@pytest.fixture(scope="module", autouse=True)
def release_debs() -> None:
    """Each host gets the build for its release: the group's .deb is Debian 12's."""
    for name, suite in fleet_mod.RELEASES.items():
        if suite != harness.SUITE:
            HOST_VARS.setdefault(name, {})["falcoria_worker_deb"] = str(deb_for(suite))


# Per-host variables as an inventory would have them; updated by the tests that change them.
HOST_VARS: dict[str, dict[str, object]] = {SECOND: {"falcoria_worker_ip": NAT_IP}}


@pytest.fixture(scope="module")
def playbook(fleet: fleet_mod.Fleet) -> fleet_mod.Playbook:
    return fleet_mod.Playbook(fleet)


def _units(count: int) -> list[str]:
    return [f"falcoria-worker@{n}.service" for n in range(1, count + 1)]


def _invocations(machine: harness.Container, count: int) -> dict[str, str]:
    return {unit: machine.show(unit, "InvocationID")["InvocationID"] for unit in _units(count)}


def _explain(result: fleet_mod.Result) -> str:
    return f"ansible-playbook rc={result.rc} in {result.seconds:.1f} s\n{result.output[-6000:]}"


def test_defaults_and_argument_specs_name_the_same_variables() -> None:
    """Every variable is documented with its default and type-checked, and the two files agree."""
    role = fleet_mod.ANSIBLE_DIR / "roles/falcoria_worker"
    defaults = yaml.safe_load((role / "defaults/main.yml").read_text())
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options)
    assert {name: spec.get("default") for name, spec in options.items()} == defaults


def test_check_mode_on_fresh_hosts_runs_without_errors(
    fleet: fleet_mod.Fleet, playbook: fleet_mod.Playbook, config: dict[str, object]
) -> None:
    result = playbook.run(config, "--check", "--diff", host_vars=HOST_VARS)
    TIMINGS["role: --check --diff, fresh hosts"] = result.seconds
    assert result.rc == 0, _explain(result)
    assert all(row["failed"] == 0 for row in result.recap.values()), _explain(result)
    for machine in fleet.machines.values():  # a dry run: nothing installed
        assert machine.run("test", "-e", "/usr/bin/falcoria-worker", check=False).returncode != 0


def test_first_rollout_runs_every_instance_and_registers_the_ips(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
    services: tuple[RedisServer, RabbitMQ],
) -> None:
    result = playbook.run(config, host_vars=HOST_VARS)
    TIMINGS["role: first rollout (2 hosts)"] = result.seconds
    assert result.rc == 0, _explain(result)
    for name in fleet.machines:
        FACTS[f"role: first rollout, changed tasks ({name})"] = result.changed(name)
    for name, machine in fleet.machines.items():
        assert result.recap[name]["failed"] == 0
        for unit in _units(INSTANCES):
            props = machine.show(unit, "ActiveState", "SubState", "UnitFileState", "StatusText")
            assert (props["ActiveState"], props["SubState"], props["UnitFileState"]) == (
                "active",
                "running",
                "enabled",
            ), f"{name} {unit}: {props}"
        secrets = machine.run(
            "stat",
            "-c",
            "%n %a %U",
            "/etc/falcoria-worker/credentials/rabbitmq_password",
            "/etc/falcoria-worker/credentials/redis_pass",
        ).stdout.split("\n")
        assert all(line.endswith(" 600 root") for line in secrets if line), secrets
        conf = machine.run("cat", "/etc/falcoria-worker/worker.conf").stdout
        assert "Ansible managed" in conf
        effective = machine.run("falcoria-worker", "config", "--instance", "2").stdout
        assert re.search(r"^CONCURRENCY += 3 .*worker@2\.conf", effective, re.M), effective
        assert str(config["falcoria_worker_rabbitmq_password"]) not in conf
    # No secret in what Ansible printed.
    for key in ("falcoria_worker_rabbitmq_password", "falcoria_worker_redis_pass"):
        assert str(config[key]) not in result.output
    redis_server, _ = services
    with redis_server.client() as redis:
        assert redis.hget(f"worker:{CANARY}", "ip") == fleet.addresses[CANARY]  # the default IPv4 from facts
        assert redis.hget(f"worker:{SECOND}", "ip") == NAT_IP  # the per-host override


def test_second_run_changes_nothing(playbook: fleet_mod.Playbook, config: dict[str, object]) -> None:
    result = playbook.run(config, host_vars=HOST_VARS)
    TIMINGS["role: second run (2 hosts)"] = result.seconds
    assert result.rc == 0, _explain(result)
    assert {name: row["changed"] for name, row in result.recap.items()} == {CANARY: 0, SECOND: 0}, (
        f"changed: {result.changed_tasks}"
    )


def test_check_diff_runs_clean(playbook: fleet_mod.Playbook, config: dict[str, object]) -> None:
    # A changed secret shows as a change, never as a diff.
    rotated = {**config, "falcoria_worker_redis_pass": "rotated-redis-secret"}
    result = playbook.run(rotated, "--check", "--diff", host_vars=HOST_VARS)
    TIMINGS["role: --check --diff (2 hosts)"] = result.seconds
    assert result.rc == 0, _explain(result)
    assert "rotated-redis-secret" not in result.output
    for name in result.recap:
        assert "Write the credential files" in result.changed_tasks.get(name, []), _explain(result)
    result = playbook.run(config, "--check", "--diff", host_vars=HOST_VARS)
    assert result.rc == 0, _explain(result)
    assert {name: row["changed"] for name, row in result.recap.items()} == {CANARY: 0, SECOND: 0}


def test_config_change_restarts_the_instances_and_nothing_else(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
) -> None:
    before = {name: _invocations(machine, INSTANCES) for name, machine in fleet.machines.items()}
    changed = {**config, "falcoria_worker_concurrency": 2}
    result = playbook.run(changed, host_vars=HOST_VARS)
    TIMINGS["role: config change (2 hosts)"] = result.seconds
    assert result.rc == 0, _explain(result)
    for name, machine in fleet.machines.items():
        assert result.changed_tasks[name] == [
            "Write worker.conf",
            "Restart for settings that only a restart applies",  # CONCURRENCY sizes the scan pool
            "Restart falcoria-worker instances",
        ], _explain(result)
        after = _invocations(machine, INSTANCES)
        assert all(after[unit] != before[name][unit] for unit in after), f"{name}: not restarted"
        assert "CONCURRENCY=2" in machine.run("cat", "/etc/falcoria-worker/worker.conf").stdout
    config["falcoria_worker_concurrency"] = 2  # the fleet's state from here on


def test_scaling_down_stops_and_disables_the_extra_instance(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
) -> None:
    # Instance 2's settings go with it (preflight refuses settings for an instance the host does not run).
    fewer = {**config, "falcoria_worker_instances": 1, "falcoria_worker_instance_settings": {}}
    result = playbook.run(fewer, host_vars=HOST_VARS)
    assert result.rc == 0, _explain(result)
    for machine in fleet.machines.values():
        props = machine.show("falcoria-worker@2.service", "ActiveState", "UnitFileState")
        assert (props["ActiveState"], props["UnitFileState"]) == ("inactive", "disabled")
        assert machine.show("falcoria-worker@1.service", "ActiveState")["ActiveState"] == "active"
        assert machine.run("test", "-e", "/etc/falcoria-worker/worker@2.conf", check=False).returncode == 1
    config.update(fewer)


def test_a_new_nat_address_is_registered_at_once(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
    services: tuple[RedisServer, RabbitMQ],
) -> None:
    moved = f"{fleet_mod.SUBNET}.213"
    result = playbook.run(config, host_vars={SECOND: {**HOST_VARS[SECOND], "falcoria_worker_ip": moved}})
    assert result.rc == 0, _explain(result)
    assert result.changed(CANARY) == 0, _explain(result)
    assert "Register this host's IP in Redis for Tasker" in result.changed_tasks[SECOND], _explain(result)
    redis_server, _ = services
    with redis_server.client() as redis:
        assert redis.hget(f"worker:{SECOND}", "ip") == moved
    HOST_VARS[SECOND]["falcoria_worker_ip"] = moved


def test_one_instance_per_source_address(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
    services: tuple[RedisServer, RabbitMQ],
) -> None:
    """falcoria_worker_source_addresses on one host: an instance per address, each with its SOURCE_ADDRESS,
    registered as `<host>-<N>` with its address, the bare host's key gone; a second run changes nothing.
    Then the variable goes and the host is back to one instance under its own name."""
    machine, second = fleet.machines[CANARY], f"{fleet_mod.SUBNET}.31"
    addresses = [fleet.addresses[CANARY], second]
    names = [f"{CANARY}-{n}" for n in (1, 2)]
    redis_server, _ = services
    harness.sh("ip", "-n", CANARY, "addr", "add", f"{second}/24", "dev", "eth0")
    try:
        host_vars = {
            **HOST_VARS,
            CANARY: {**HOST_VARS.get(CANARY, {}), "falcoria_worker_source_addresses": addresses},
        }
        result = playbook.run(config, host_vars=host_vars)
        assert result.rc == 0, _explain(result)
        for n, address in enumerate(addresses, start=1):
            props = machine.show(f"falcoria-worker@{n}.service", "ActiveState", "UnitFileState")
            assert (props["ActiveState"], props["UnitFileState"]) == ("active", "enabled"), (n, props)
            effective = machine.run("falcoria-worker", "config", "--instance", str(n)).stdout
            assert re.search(
                rf"^SOURCE_ADDRESS += {re.escape(address)} .*worker@{n}\.conf", effective, re.M
            ), effective
            assert re.search(rf"^HOSTNAME += {names[n - 1]} ", effective, re.M), effective
        with redis_server.client() as redis:
            registered = {name: redis.hget(f"worker:{name}", "ip") for name in names}
            assert registered == dict(zip(names, addresses, strict=True)), registered
            assert not redis.exists(f"worker:{CANARY}")
        again = playbook.run(config, host_vars=host_vars)
        assert again.rc == 0, _explain(again)
        assert {name: row["changed"] for name, row in again.recap.items()} == {CANARY: 0, SECOND: 0}, (
            f"changed: {again.changed_tasks}"
        )
    finally:
        # Back to one instance under the host's own name, for the tests that follow.
        restored = playbook.run(config, host_vars=HOST_VARS)
        harness.sh("ip", "-n", CANARY, "addr", "del", f"{second}/24", "dev", "eth0", check=False)
        with redis_server.client() as redis:
            redis.delete(*(f"worker:{name}" for name in names))
    assert restored.rc == 0, _explain(restored)
    assert machine.show("falcoria-worker@2.service", "ActiveState")["ActiveState"] == "inactive"
    with redis_server.client() as redis:
        assert redis.hget(f"worker:{CANARY}", "ip") == fleet.addresses[CANARY]


def test_a_canary_with_wrong_broker_settings_stops_the_rollout(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
    services: tuple[RedisServer, RabbitMQ],
) -> None:
    _, broker = services
    second_conf = fleet.machines[SECOND].run("cat", "/etc/falcoria-worker/worker.conf").stdout
    # A new setting for the whole fleet, and for the canary a broker port where nothing listens (the
    # port right above RabbitMQ's block is not one of its listeners).
    wave = {**config, "falcoria_worker_logger_level": "DEBUG"}
    host_vars = {**HOST_VARS, CANARY: {"falcoria_worker_rabbitmq_port": broker.port + 13}}
    started = time.monotonic()
    result = playbook.run(wave, host_vars=host_vars)
    TIMINGS["role: failing canary"] = time.monotonic() - started
    assert result.rc != 0, _explain(result)
    assert result.recap[CANARY]["failed"] == 1, _explain(result)
    assert "FAIL rabbitmq" in result.output, _explain(result)
    # The next batch never started: the second host is not in the recap and its config is untouched.
    assert fleet_mod.hosts_in(result, [SECOND]) == [], _explain(result)
    assert fleet.machines[SECOND].run("cat", "/etc/falcoria-worker/worker.conf").stdout == second_conf


@contextlib.contextmanager
def served_repository(fleet: fleet_mod.Fleet, debs: list[str], out: Path) -> Iterator[tuple[str, str]]:
    """scripts/make-repo's signed repository (a generated test key) of `debs` (SUITE=FILE), served over
    http on the fleet's bridge address; yields (URL, the armored public key)."""
    argv = [str(harness.REPO / "scripts/make-repo"), "--out", str(out)]
    for deb in debs:
        argv += ["--deb", deb]
    made = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    root = Path(made.stdout.strip().splitlines()[-1])
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer((fleet.host_ip, 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="apt-repository", daemon=True)
    thread.start()
    try:
        yield f"http://{fleet.host_ip}:{server.server_address[1]}", (root / "falcoria-worker.asc").read_text()
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def apt_repository(fleet: fleet_mod.Fleet, falcoria_deb: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The fleet's repository with each release's .deb."""
    debs = [f"{suite}={deb_for(suite)}" for suite in sorted(set(fleet_mod.RELEASES.values()))]
    with served_repository(fleet, debs, tmp_path / "repo") as served:
        yield served


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """apt's requests are not the test's output."""


def test_install_from_the_signed_repository(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
    apt_repository: tuple[str, str],
) -> None:
    """The hosts drop the pushed package and install it again from the fleet's repository: a deb822
    source whose Signed-By is the repository's key alone; a second run changes nothing."""
    url, key = apt_repository
    for machine in fleet.machines.values():
        machine.run("dpkg", "--purge", "falcoria-worker", timeout=300)  # stops the instances first
    from_repo = {
        **config,
        "falcoria_worker_package_source": "apt",
        "falcoria_worker_apt_repository_url": url,
        "falcoria_worker_apt_repository_key": key,
    }
    # The canary's broken broker port of the previous test is gone: plain host variables again.
    result = playbook.run(from_repo, host_vars=HOST_VARS)
    TIMINGS["role: install from the signed repository (2 hosts)"] = result.seconds
    assert result.rc == 0, _explain(result)
    for name, machine in fleet.machines.items():
        source = machine.run("cat", "/etc/apt/sources.list.d/falcoria-worker.sources").stdout
        assert f"URIs: {url}" in source and "Signed-By: /etc/apt/keyrings/falcoria-worker.asc" in source
        assert f"Suites: {fleet_mod.RELEASES[name]}" in source
        policy = machine.run("apt-cache", "policy", "falcoria-worker").stdout
        assert url in policy, policy
        assert machine.show("falcoria-worker@1.service", "ActiveState")["ActiveState"] == "active"
    again = playbook.run(from_repo, host_vars=HOST_VARS)
    assert again.rc == 0, _explain(again)
    assert {name: row["changed"] for name, row in again.recap.items()} == {CANARY: 0, SECOND: 0}, (
        f"changed: {again.changed_tasks}"
    )


def test_an_upgrade_drains_the_instances_and_lets_their_scans_finish(
    fleet: fleet_mod.Fleet,
    playbook: fleet_mod.Playbook,
    config: dict[str, object],
    services: tuple[RedisServer, RabbitMQ],
    tmp_path: Path,
) -> None:
    """A new version in the repository: before apt upgrades a host, its instances stop taking scans and
    the scan one of them runs finishes on the old version (it is not handed back); then the instances
    restart on the new version."""
    redis_server, broker = services
    machine = fleet.machines[CANARY]
    suffix = "rollout1"
    debs, versions = [], {}
    for suite in sorted(set(fleet_mod.RELEASES.values())):
        deb = repacked(deb_for(suite), suffix)
        debs.append(f"{suite}={deb}")
        versions[suite] = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    # Only the canary takes the scan: the other host's instances are drained by hand first.
    for instance in range(1, int(str(config["falcoria_worker_instances"])) + 1):
        other = fleet.machines[SECOND].run("falcoria-worker", "drain", f"--instance={instance}", check=False)
        assert other.returncode == 0, other.stdout + other.stderr
    host_vars = {
        name: {**HOST_VARS.get(name, {}), "falcoria_worker_package_version": versions[suite]}
        for name, suite in fleet_mod.RELEASES.items()
    }
    tasker = Tasker(broker, redis_server.client())
    with served_repository(fleet, debs, tmp_path / "repo") as (url, key):
        try:
            # The other machine of the fleet, probed slowly: the scan outlasts the play's steps before the
            # drain.
            task_id = tasker.send_scan(
                ip=fleet.addresses[SECOND],
                open_ports_opts="-sT -n -Pn --max-retries 0 --scan-delay 1500ms -p 1-40",
                open_ports_str="1-40",
                timeout=900,
            )
            assert task_id is not None
            deadline = time.monotonic() + 120
            while status(redis_server, task_id).get("state") != "ports_scan" and time.monotonic() < deadline:
                time.sleep(0.5)
            running = status(redis_server, task_id)
            assert running.get("state") == "ports_scan" and CANARY in running.get("worker", ""), running
            upgrade = {
                **config,
                "falcoria_worker_package_source": "apt",
                "falcoria_worker_apt_repository_url": url,
                "falcoria_worker_apt_repository_key": key,
                "falcoria_worker_drain_timeout": 600,
            }
            result = playbook.run(upgrade, host_vars=host_vars)
        finally:
            tasker.close()
    TIMINGS["role: upgrade with a scan to finish (2 hosts)"] = result.seconds
    assert result.rc == 0, _explain(result)
    assert "Drain the running instances and wait for their scans" in result.changed_tasks[CANARY], _explain(
        result
    )
    final = status(redis_server, task_id)
    assert final.get("state") == "completed", final
    unit = f"falcoria-worker@{running['worker'].split('@')[0].removeprefix('worker')}"
    log = machine.run("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
    drained, finished = log.rfind("draining: taking no new scans"), log.rfind("scan finished")
    started = log.rfind(f"falcoria-worker {versions[fleet_mod.RELEASES[CANARY]].replace('+deb13', '')}")
    assert -1 < drained < finished < started, log[-3000:]
    for name, suite in fleet_mod.RELEASES.items():
        installed = fleet.machines[name].run("dpkg-query", "-W", "-f=${Version}", "falcoria-worker").stdout
        assert installed == versions[suite], (name, installed)
        props = fleet.machines[name].show("falcoria-worker@1.service", "ActiveState")
        assert props["ActiveState"] == "active", (name, props)
