"""The .deb in a booted Debian 12 and 13 (each test once per release, see conftest.py): install, units,
refusal without a broker, running instances with CAP_NET_RAW only, restart through the target and on
upgrade, journal, purge.

One scenario in order (the tests share the container and build on each other's state): install ->
inspect -> start unconfigured -> configure and run @1 and @2 -> restarts -> purge.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.fakes.scanledger import FakeScanLedger
from tests.support.services import RabbitMQ, RedisServer
from tests.support.tasker import Tasker
from tests.system import harness
from tests.system.conftest import BUILD_LOGS, DEEP, UPGRADE_SUFFIX, report

# The first test of each release waits for its fixtures: on a fresh machine a cold rootfs build and the
# package build, minutes each on a busy 2-core machine (deb_for allows a build 900 s).
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

USER = "falcoria-worker"
INSTANCES = ("falcoria-worker@1.service", "falcoria-worker@2.service")
CAP_NET_RAW = 1 << 13
DEB_INSIDE = "/root/falcoria-worker.deb"
VENV = "/opt/venvs/falcoria-worker"


@pytest.fixture(scope="module")
def box(system_container: harness.Container, package_deb: Path) -> harness.Container:
    """The container with the package installed from its file (no network: the deps are in the rootfs)."""
    system_container.copy_in(package_deb, DEB_INSIDE)
    started = time.monotonic()
    system_container.run("apt-get", "install", "-y", DEB_INSIDE, timeout=300)
    report(system_container.suite)[0]["deb install in container"] = time.monotonic() - started
    return system_container


def _invocations(box: harness.Container) -> dict[str, str]:
    return {unit: box.show(unit, "InvocationID")["InvocationID"] for unit in INSTANCES}


def _wait_state(box: harness.Container, unit: str, states: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    props: dict[str, str] = {}
    while time.monotonic() < deadline:
        props = box.show(
            unit, "ActiveState", "SubState", "Result", "ExecMainStatus", "NRestarts", "StatusText"
        )
        if props["ActiveState"] in states:
            return props
        time.sleep(0.2)
    return props


@pytest.fixture(autouse=True)
def _start_limits_reset(request: pytest.FixtureRequest) -> None:
    """Every test of the running instances starts with systemd's start-rate count of them at zero: the
    scenario starts them more often than StartLimitBurst allows within StartLimitIntervalSec, and trixie's
    systemd keeps that count across daemon-reload."""
    if "configured" in request.fixturenames:
        request.getfixturevalue("configured").systemctl("reset-failed", *INSTANCES)


# --- installation --------------------------------------------------------------------------------------


def test_install_creates_a_static_system_user(box: harness.Container) -> None:
    name, _, uid, gid, _, home, shell = box.run("getent", "passwd", USER).stdout.strip().split(":")
    assert 0 < int(uid) < 1000, f"{name} uid {uid} is not a system uid (Debian: below 1000)"
    assert box.run("getent", "group", USER).stdout.split(":")[2] == gid
    assert (home, shell) == ("/var/lib/falcoria-worker", "/usr/sbin/nologin")


def test_install_lays_out_files_with_safe_modes(box: harness.Container) -> None:
    def stat(path: str) -> str:
        return box.run("stat", "-c", "%a %U %G", path).stdout.strip()

    assert stat("/etc/falcoria-worker/worker.conf") == f"640 root {USER}"
    assert stat("/etc/falcoria-worker/credentials") == "700 root root"
    assert (
        box.run("readlink", "-f", "/usr/bin/falcoria-worker").stdout.strip()
        == "/opt/venvs/falcoria-worker/bin/falcoria-worker"
    )
    box.run("test", "-f", "/usr/share/man/man8/falcoria-worker.8.gz")
    conffiles = box.run("dpkg-query", "-W", "-f=${Conffiles}", "falcoria-worker").stdout
    assert "/etc/falcoria-worker/worker.conf" in conffiles


def test_install_enables_the_target_but_starts_no_worker(box: harness.Container) -> None:
    assert box.systemctl("is-enabled", "falcoria-worker.target").stdout.strip() == "enabled"
    assert box.systemctl("is-active", "falcoria-worker.target").stdout.strip() == "active"
    running = box.systemctl("list-units", "--no-legend", "--all", "falcoria-worker@*").stdout
    assert running.strip() == "", f"an instance exists right after install:\n{running}"


def test_units_verify_inside(box: harness.Container) -> None:
    # --man=no: minbase has no man-db; the page itself is checked above.
    proc = box.run(
        "systemd-analyze",
        "verify",
        "--man=no",
        "falcoria-worker@1.service",
        "falcoria-worker.target",
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_security_gate_on_the_installed_unit(box: harness.Container) -> None:
    inside = box.run(
        "systemd-analyze",
        "security",
        "--no-pager",
        "--threshold=20",
        "falcoria-worker@1.service",
        check=False,
    )
    assert inside.returncode == 0, inside.stdout + inside.stderr
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", inside.stdout)
    assert score, inside.stdout
    report(box.suite)[1]["exposure of the installed unit (live, 0-10)"] = float(score[1])
    # The same gate the CI runs on the checkout, here against the container's installed tree.
    gate = subprocess.run(
        [str(harness.REPO / "scripts/security-gate"), "--root", str(box.root)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert gate.returncode == 0, gate.stdout + gate.stderr


def test_version_and_check_inside(box: harness.Container, package_deb: Path) -> None:
    # The program's own version: a trixie build's Debian version adds +deb13 (scripts/build-deb).
    version = package_deb.name.split("_")[1].split("+deb")[0]
    assert box.run("falcoria-worker", "--version").stdout.strip() == f"falcoria-worker {version}"
    check = box.run("falcoria-worker", "check", check=False)
    # No broker is configured yet, so some checks fail; the command itself must not crash.
    assert check.returncode in (0, 1), check.stdout + check.stderr
    assert "Traceback" not in check.stdout + check.stderr
    assert "nmap" in check.stdout


def test_unconfigured_instance_refuses_to_start(box: harness.Container) -> None:
    """Decision: the program refuses (exit 2, reason in the journal), the unit does not restart on 2."""
    unit = INSTANCES[0]
    box.systemctl("start", "--no-block", unit)
    props = _wait_state(box, unit, {"failed", "inactive"}, timeout=10)
    box.systemctl("stop", unit)
    box.systemctl("reset-failed", unit)
    assert props["ActiveState"] == "failed", f"no refusal within 10 s: {props}"
    assert (props["ExecMainStatus"], props["NRestarts"]) == ("2", "0"), props
    log = box.journal("-u", unit, "-o", "cat")
    assert "RABBITMQ_HOST" in log, log


# --- running instances ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ledger(box: harness.Container) -> Iterator[FakeScanLedger]:
    """The fake ScanLedger on the host's bridge address, where the container's workers reach it."""
    fake = FakeScanLedger(host=box.lab.host_ip)
    fake.token = fake.add_token()
    fake.project = fake.add_project()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def configured(
    box: harness.Container, bridge_services: tuple[RedisServer, RabbitMQ], ledger: FakeScanLedger
) -> harness.Container:
    """worker.conf pointing at the host's Redis, RabbitMQ and ScanLedger; secrets as LoadCredential= files."""
    redis_server, broker = bridge_services
    host = box.lab.host_ip
    conf = box.path("/etc/falcoria-worker/worker.conf")
    # Appended, so that the shipped file's owner and mode (root:falcoria-worker 0640) stay as they are.
    with conf.open("a") as handle:
        handle.write(
            f"\nRABBITMQ_HOST={host}\nRABBITMQ_PORT={broker.port}\nRABBITMQ_USER={broker.user}\n"
            f"RABBITMQ_VHOST={broker.vhost}\nREDIS_HOST={host}\nREDIS_PORT={redis_server.port}\n"
            f"REDIS_DB={redis_server.db}\nBACKEND_BASE_URL={ledger.url}\n"
        )
    box.write("/etc/falcoria-worker/credentials/worker_backend_token", ledger.token, mode=0o600)
    box.write("/etc/falcoria-worker/credentials/rabbitmq_password", broker.password, mode=0o600)
    box.write("/etc/falcoria-worker/credentials/redis_pass", redis_server.password, mode=0o600)
    return box


def test_instances_start_ready_with_cap_net_raw_only(configured: harness.Container) -> None:
    box = configured
    started = time.monotonic()
    # As the man page says; Type=notify: returns once both sent READY=1.
    start = box.systemctl("enable", "--now", *INSTANCES, timeout=120)
    report(box.suite)[0]["start @1+@2 until READY"] = time.monotonic() - started
    assert start.returncode == 0, start.stderr + box.journal(
        "-u", "falcoria-worker@*", "-n", "40", "-o", "cat"
    )
    for unit in INSTANCES:
        props = box.show(unit, "ActiveState", "SubState", "MainPID", "StatusText", "User")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        status = box.proc_status(int(props["MainPID"]))
        uids = status["Uid"].split()
        assert uids[0] != "0" and len(set(uids)) == 1, status["Uid"]
        for caps in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
            assert int(status[caps], 16) == CAP_NET_RAW, f"{unit} {caps}={status[caps]}"
        assert status["NoNewPrivs"] == "1"


def test_tasker_task_is_syn_scanned_and_uploaded_under_the_unit(
    configured: harness.Container, ledger: FakeScanLedger, bridge_services: tuple[RedisServer, RabbitMQ]
) -> None:
    """A Tasker-shaped task through RabbitMQ: nmap runs as the service user with CAP_NET_RAW only, the
    unit's StatusText follows the scan, the journal holds the task's records under TASK_ID=, and the
    merged report reaches ScanLedger."""
    box = configured
    redis_server, broker = bridge_services
    target, ports = next(iter(box.lab.targets.items()))
    port_list = ",".join(map(str, sorted({*ports, 443})))
    tasker = Tasker(broker, redis_server.client())
    try:
        task_id = tasker.send_scan(
            ip=target,
            project=uuid.UUID(ledger.project),
            mode="append",
            open_ports_opts=f"-sS -n --max-retries 1 -Pn -p {port_list}",
            # the listeners' banners match no probe: -sV keeps nmap busy long enough to look at it
            service_opts="-sV --version-intensity 0 -Pn",
            open_ports_str=port_list.replace(",", " "),
        )
        statuses: set[str] = set()
        nmap_status: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while not ledger.uploads and time.monotonic() < deadline:
            for unit in INSTANCES:
                statuses.add(box.show(unit, "StatusText")["StatusText"])
            pids = box.run("pgrep", "-x", "nmap", check=False).stdout.split()
            if pids and not nmap_status:
                with contextlib.suppress(Exception):  # nmap may exit between pgrep and the read
                    nmap_status = box.proc_status(int(pids[0]))
            time.sleep(0.1)
        assert len(ledger.uploads) == 1, (
            statuses,
            ledger.rejections,
            box.journal("-u", "falcoria-worker@*", "-n", "60", "-o", "cat"),
        )
        xml = ledger.uploads[0].xml.decode()
        assert 'scaninfo type="syn"' in xml  # a SYN scan, not a silent fall-back to connect()
        assert {int(p) for p in re.findall(r'portid="(\d+)"><state state="open"', xml)} == set(ports)
        assert nmap_status, "never saw the nmap process"
        assert nmap_status["Uid"].split()[0] != "0"
        for caps in ("CapEff", "CapPrm", "CapAmb"):
            assert int(nmap_status[caps], 16) == CAP_NET_RAW, f"nmap {caps}={nmap_status[caps]}"
        assert "idle" in statuses
        assert any(s.startswith(f"scanning {target}: open ports") or "service scan" in s for s in statuses)
        records = box.journal(f"TASK_ID={task_id}", "-o", "cat")
        assert "received scan" in records and "scan finished" in records, records
    finally:
        tasker.close()


def _wait_status(box: harness.Container, unit: str, wanted: str, timeout: float) -> set[str]:
    """The StatusText values seen until one starts with `wanted` (or the timeout)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.add(box.show(unit, "StatusText")["StatusText"])
        if any(text.startswith(wanted) for text in seen):
            break
        time.sleep(0.2)
    return seen


def _slow_scan(tasker: Tasker, target: str, project: str) -> str | None:
    """Closed ports probed slowly: the scan is still running seconds after it started."""
    return tasker.send_scan(
        ip=target,
        project=uuid.UUID(project),
        open_ports_opts="-sS -n -Pn --max-retries 0 --scan-delay 500ms -p 1-40",
        service_opts="-sV --version-intensity 0 -Pn",
        open_ports_str="1-40",
    )


def _quick_scan(tasker: Tasker, target: str, ports: Iterable[int], project: str) -> str | None:
    """The target's listeners; -sV at intensity 0, as their banners match no probe."""
    listed = sorted(ports)
    return tasker.send_scan(
        ip=target,
        project=uuid.UUID(project),
        open_ports_opts=f"-sS -n -Pn --max-retries 1 -p {','.join(map(str, listed))}",
        service_opts="-sV --version-intensity 0 -Pn",
        open_ports_str=" ".join(map(str, listed)),
    )


def _wait_uploads(ledger: FakeScanLedger, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(ledger.uploads) < count and time.monotonic() < deadline:
        time.sleep(0.2)


def test_drained_instance_finishes_its_scan_takes_no_new_one_and_resumes(
    configured: harness.Container, ledger: FakeScanLedger, bridge_services: tuple[RedisServer, RabbitMQ]
) -> None:
    """`falcoria-worker drain` as root in the machine: the instance's running scan finishes and is
    uploaded, a task sent meanwhile waits in the queue, and `drain --resume` lets the instance take it."""
    box = configured
    redis_server, broker = bridge_services
    unit, other = INSTANCES
    target, ports = next(iter(box.lab.targets.items()))
    uploads = len(ledger.uploads)
    box.systemctl("stop", other, check=True)  # the drained instance is the only consumer
    tasker = Tasker(broker, redis_server.client())
    try:
        slow = _slow_scan(tasker, target, ledger.project)
        seen = _wait_status(box, unit, f"scanning {target}", timeout=60)
        assert any(text.startswith(f"scanning {target}") for text in seen), seen
        drained = box.run("falcoria-worker", "drain", "--instance", "1", check=False)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        seen = _wait_status(box, unit, "draining: 1 scan left", timeout=30)
        assert any(text.startswith("draining: 1 scan left") for text in seen), seen
        waiting = _quick_scan(tasker, target, ports, ledger.project)
        done = box.run("falcoria-worker", "drain", "--instance", "1", "--wait", timeout=180, check=False)
        assert done.returncode == 0 and "drained, no scan left" in done.stdout, done.stdout + done.stderr
        _wait_uploads(ledger, uploads + 1)
        with redis_server.client() as redis:
            assert redis.hget(f"task:{slow}:status", "state") == "completed"
            assert redis.hget(f"task:{waiting}:status", "state") in (None, "queued")
        assert len(ledger.uploads) == uploads + 1
        resumed = box.run("falcoria-worker", "drain", "--instance", "1", "--resume", check=False)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        _wait_uploads(ledger, uploads + 2)
        assert len(ledger.uploads) == uploads + 2, (
            redis_server.client().hgetall(f"task:{waiting}:status"),
            ledger.rejections,
            box.journal("-u", unit, "-n", "30", "-o", "cat"),
        )
        with redis_server.client() as redis:
            assert redis.hget(f"task:{waiting}:status", "state") == "completed"
    finally:
        tasker.close()
        box.systemctl("start", other)


def _operator(box: harness.Container) -> None:
    """fw-operator: a user in the service's group, not root."""
    if box.run("id", "fw-operator", check=False).returncode != 0:
        box.run("useradd", "--no-create-home", "--groups", "falcoria-worker", "fw-operator")


def test_status_for_a_member_of_the_group_without_root(configured: harness.Container) -> None:
    """`falcoria-worker status --json` run by a user in the service's group sees every instance: systemd's
    state and the instance's own status file in /run/falcoria-worker/N (0750 directory, 0640 file)."""
    box = configured
    _operator(box)
    shown = box.run("runuser", "-u", "fw-operator", "--", "falcoria-worker", "status", "--json", check=False)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = {row["instance"]: row for row in json.loads(shown.stdout)}
    assert set(rows) == {"1", "2"}, rows
    for row in rows.values():
        # .get: a unit that is not active has no status-file fields, and the row says why.
        assert (row["active"], row["sub"], row.get("state")) == ("active", "running", "ready"), (
            row,
            box.journal("-u", f"falcoria-worker@{row['instance']}", "-n", "40", "-o", "short-monotonic"),
        )
        assert row["spool"] == {"pending": 0, "failed": 0}, row
    table = box.run("runuser", "-u", "fw-operator", "--", "falcoria-worker", "status").stdout
    assert [line.split()[:3] for line in table.splitlines()[1:]] == [
        ["1", "active/running", "ready"],
        ["2", "active/running", "ready"],
    ], table


def _journal_until(box: harness.Container, invocation: str, text: str, timeout: float = 30) -> str:
    """The journal of one invocation of a unit, once it holds `text` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    log = ""
    while text not in log and time.monotonic() < deadline:
        log = box.journal(f"_SYSTEMD_INVOCATION_ID={invocation}", "-o", "cat")
        time.sleep(0.2)
    return log


def test_reload_applies_a_setting_without_a_restart(configured: harness.Container) -> None:
    """`systemctl reload falcoria-worker@1` (SIGHUP) re-reads worker@1.conf: the same process goes on, the
    journal names the changed setting; a broken file is refused and the running settings stay."""
    box = configured
    unit = INSTANCES[0]
    conf = "/etc/falcoria-worker/worker@1.conf"
    before = box.show(unit, "MainPID", "InvocationID")
    try:
        box.write(conf, "SCOPE_DENY=10.250.255.0/24\n", mode=0o640)
        box.run("chgrp", "falcoria-worker", conf)
        box.systemctl("reload", unit, check=True)
        log = _journal_until(box, before["InvocationID"], "configuration reloaded; ")
        assert "configuration reloaded; changed: SCOPE_DENY" in log, log[-2000:]
        box.write(conf, "CONCURRENCY=not-a-number\n", mode=0o640)
        box.systemctl("reload", unit, check=True)
        log = _journal_until(box, before["InvocationID"], "configuration not reloaded")
        assert "configuration not reloaded, the previous one stays in force" in log, log[-2000:]
        assert box.show(unit, "MainPID", "InvocationID") == before
        assert box.show(unit, "ActiveState")["ActiveState"] == "active"
    finally:
        box.run("rm", "-f", conf)
        box.systemctl("reload", unit)


def _state(
    redis_server: RedisServer, task_id: str | None, wanted: set[str], timeout: float
) -> dict[str, str]:
    """task:{id}:status once its state is one of `wanted` (or at the timeout)."""
    deadline = time.monotonic() + timeout
    with redis_server.client() as redis:
        found = redis.hgetall(f"task:{task_id}:status")
        while found.get("state") not in wanted and time.monotonic() < deadline:
            time.sleep(0.2)
            found = redis.hgetall(f"task:{task_id}:status")
    return found


def test_status_and_reload_while_an_instance_scans(
    configured: harness.Container, ledger: FakeScanLedger, bridge_services: tuple[RedisServer, RabbitMQ]
) -> None:
    """While one instance scans: `status` shows its scan to a member of the group, and a reload of that
    instance lets the scan complete once on the same process while the next task gets the new settings
    (here a SCOPE_DENY of the target, so the next task is refused)."""
    box = configured
    redis_server, broker = bridge_services
    target, ports = next(iter(box.lab.targets.items()))
    uploads = len(ledger.uploads)
    tasker = Tasker(broker, redis_server.client())
    scanning = other = ""
    try:
        slow = _slow_scan(tasker, target, ledger.project)
        running = _state(redis_server, slow, {"ports_scan"}, timeout=60)
        assert running.get("state") == "ports_scan", running
        instance = running["worker"].split("@")[0].removeprefix("worker")
        scanning, other = (
            f"falcoria-worker@{instance}.service",
            f"falcoria-worker@{3 - int(instance)}.service",
        )
        shown = box.run("runuser", "-u", "fw-operator", "--", "falcoria-worker", "status", "--json")
        rows = {row["instance"]: row for row in json.loads(shown.stdout)}
        assert [(t["task_id"], t["target"], t["phase"]) for t in rows[instance]["tasks"]] == [
            (slow, target, "ports_scan")
        ], rows
        assert rows[str(3 - int(instance))].get("tasks") == [], (rows, box.journal("-n", "60", "-o", "cat"))

        before = box.show(scanning, "MainPID", "InvocationID")
        conf = f"/etc/falcoria-worker/worker@{instance}.conf"
        box.write(conf, f"SCOPE_DENY={target}/32\n", mode=0o640)
        box.run("chgrp", "falcoria-worker", conf)
        box.systemctl("reload", scanning, check=True)
        log = _journal_until(box, before["InvocationID"], "configuration reloaded; ")
        assert "configuration reloaded; changed: SCOPE_DENY" in log, log[-2000:]

        done = _state(redis_server, slow, {"completed", "failed", "cancelled"}, timeout=120)
        assert done.get("state") == "completed", done
        _wait_uploads(ledger, uploads + 1)
        assert len(ledger.uploads) == uploads + 1
        assert box.show(scanning, "MainPID", "InvocationID") == before

        box.systemctl("stop", other, check=True)  # the next task goes to the reloaded instance
        refused = _quick_scan(tasker, target, ports, ledger.project)
        ended = _state(redis_server, refused, {"completed", "failed"}, timeout=60)
        assert ended.get("state") == "failed" and "denied" in ended.get("error", ""), ended
        assert len(ledger.uploads) == uploads + 1
    finally:
        tasker.close()
        if scanning:
            box.run("rm", "-f", f"/etc/falcoria-worker/worker@{scanning.split('@')[1].split('.')[0]}.conf")
            box.systemctl("reload", scanning)
            box.systemctl("start", other)


def test_spool_retry_of_a_refused_report(
    configured: harness.Container, ledger: FakeScanLedger, bridge_services: tuple[RedisServer, RabbitMQ]
) -> None:
    """ScanLedger refuses a report for good (its project does not exist yet): the report waits in the
    instance's spool/failed; once the project exists, `falcoria-worker spool retry --all` as root hands it
    back to the running instance, which uploads it."""
    box = configured
    redis_server, broker = bridge_services
    target, ports = next(iter(box.lab.targets.items()))
    project = str(uuid.uuid4())
    uploads = len(ledger.uploads)
    tasker = Tasker(broker, redis_server.client())
    try:
        task_id = _quick_scan(tasker, target, ports, project)
        ended = _state(redis_server, task_id, {"completed", "failed"}, timeout=120)
        instance = ended["worker"].split("@")[0].removeprefix("worker")
        entries: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while not any(e["state"] == "failed" and e["task_id"] == task_id for e in entries):
            assert time.monotonic() < deadline, (entries, ledger.rejections)
            time.sleep(0.5)
            shown = box.run("falcoria-worker", "spool", "list", "--json", f"--instance={instance}")
            entries = json.loads(shown.stdout)["entries"]
        ledger.add_project(project)
        retried = box.run("falcoria-worker", "spool", "retry", "--all", f"--instance={instance}", check=False)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        _wait_uploads(ledger, uploads + 1)
        assert [u.project for u in ledger.uploads[uploads:]] == [project]
        after = box.run("falcoria-worker", "spool", "list", "--json", f"--instance={instance}").stdout
        assert json.loads(after)["entries"] == [], after
    finally:
        tasker.close()


def test_each_instance_scans_from_its_own_source_address(
    configured: harness.Container, ledger: FakeScanLedger, bridge_services: tuple[RedisServer, RabbitMQ]
) -> None:
    """Two addresses on the machine's eth0 and SOURCE_ADDRESS per instance in worker@N.conf: each
    instance's task reaches its target's listeners from that instance's own address, and each instance is
    the worker `<host name>-<N>` (its node name, its status entries) registered in Redis with its address."""
    box = configured
    redis_server, broker = bridge_services
    second = f"{box.lab.container_ip.rsplit('.', 1)[0]}.11"
    addresses = (box.lab.container_ip, second)
    # HOSTNAME's default is the machine's host name (the kernel's, in the container's UTS namespace).
    host = box.run("cat", "/proc/sys/kernel/hostname").stdout.strip()
    names = [f"{host}-{n}" for n in (1, 2)]
    confs = [f"/etc/falcoria-worker/worker@{n}.conf" for n in (1, 2)]
    uploads = len(ledger.uploads)
    harness.sh("ip", "-n", box.lab.container_netns, "addr", "add", f"{second}/24", "dev", "eth0")
    tasker = Tasker(broker, redis_server.client())
    try:
        for conf, address in zip(confs, addresses, strict=True):
            box.write(conf, f"SOURCE_ADDRESS={address}\n", mode=0o640)
            box.run("chgrp", "falcoria-worker", conf)
        box.systemctl("restart", *INSTANCES, check=True, timeout=120)
        for n, address, (target, ports) in zip((1, 2), addresses, box.lab.targets.items(), strict=True):
            unit, other = INSTANCES[n - 1], INSTANCES[2 - n]
            box.systemctl("stop", other, check=True)  # this instance is the only consumer
            box.systemctl("start", unit, check=True, timeout=120)
            seen = len(box.lab.peers(target))
            task_id = _quick_scan(tasker, target, ports, ledger.project)
            uploads += 1
            _wait_uploads(ledger, uploads)
            assert len(ledger.uploads) == uploads, (ledger.rejections, box.journal("-u", unit, "-n", "30"))
            status = _state(redis_server, task_id, {"completed"}, timeout=30)
            assert status["worker"] == f"worker{n}@{names[n - 1]}", status
            # -sV connects from the instance's address; phase 1's raw SYNs never reach accept()
            assert set(box.lab.peers(target)[seen:]) == {address}, (unit, box.lab.peers(target)[seen:])
        # Each instance registered its own name with its own address when it first reached Redis.
        with redis_server.client() as redis:
            registered = {name: redis.hget(f"worker:{name}", "ip") for name in names}
        assert registered == dict(zip(names, addresses, strict=True)), registered
    finally:
        tasker.close()
        box.run("rm", "-f", *confs)
        box.systemctl("restart", *INSTANCES, timeout=120)
        harness.sh("ip", "-n", box.lab.container_netns, "addr", "del", f"{second}/24", "dev", "eth0")
        # The per-address names are gone with the settings; later tests see only the bare host's worker.
        with redis_server.client() as redis:
            redis.delete(*(f"worker:{name}" for name in names))


def test_target_restart_restarts_every_instance(configured: harness.Container) -> None:
    before = _invocations(configured)
    assert configured.systemctl("restart", "falcoria-worker.target", timeout=120).returncode == 0
    after = _invocations(configured)
    for unit in INSTANCES:
        assert configured.systemctl("is-active", unit).stdout.strip() == "active", unit
        assert after[unit] != before[unit], f"{unit} was not restarted"


def test_rebuild_from_a_deep_checkout_is_lintian_clean_with_plain_entry_points(deep_rebuild: Path) -> None:
    """The upgrade's rebuild comes from a checkout path over 120 characters (conftest.deep_checkout): the
    venv's console scripts still start with a plain #! line to the venv's interpreter (pip's /bin/sh
    wrappers for over-long interpreter paths fail lintian), and lintian reports no error or warning."""
    assert len(str(deep_rebuild.parents[2])) > DEEP, deep_rebuild
    log = BUILD_LOGS[deep_rebuild]
    assert "lintian clean" in log, log[-4000:]
    assert not re.search(r"^[EW]: |mismatched-override", log, re.M), log[-4000:]
    tree = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deep_rebuild)], capture_output=True, check=True)
    bin_dir = f".{VENV}/bin/"
    first_lines = {}
    with tarfile.open(fileobj=io.BytesIO(tree.stdout)) as archive:
        for member in archive:
            if member.name.startswith(bin_dir) and member.isfile() and member.mode & 0o111:
                script = archive.extractfile(member)
                assert script is not None
                first_lines[member.name.removeprefix(bin_dir)] = script.readline().decode().rstrip("\n")
    assert "falcoria-worker" in first_lines, first_lines
    assert set(first_lines.values()) <= {f"#!{VENV}/bin/python", f"#!{VENV}/bin/python3"}, first_lines


def test_upgrade_to_a_higher_version_restarts_instances_on_the_new_code(
    configured: harness.Container, upgraded_deb: Path
) -> None:
    """apt installs a rebuilt package with a higher version: the running instances are restarted through
    the target and the new processes run the new build (its version is in their start-up record)."""
    box = configured
    before = _invocations(box)
    box.copy_in(upgraded_deb, "/root/falcoria-worker-upgrade.deb")
    box.run("apt-get", "install", "-y", "/root/falcoria-worker-upgrade.deb", timeout=300)
    installed = box.run("dpkg-query", "-W", "-f=${Version}", "falcoria-worker").stdout
    assert installed.endswith(f"+{UPGRADE_SUFFIX}"), installed
    new_version = box.run("falcoria-worker", "--version").stdout.split()[-1]
    assert new_version.endswith(f"+{UPGRADE_SUFFIX}"), new_version
    after = _invocations(box)
    for unit in INSTANCES:
        assert box.systemctl("is-active", unit).stdout.strip() == "active", unit
        assert after[unit] != before[unit], f"{unit} kept running the old code"
        started = box.journal(f"_SYSTEMD_INVOCATION_ID={after[unit]}", "-o", "cat")
        assert f"falcoria-worker {new_version} starting" in started, started[-2000:]


def _download_installed(box: harness.Container, package: str, into: Path) -> Path:
    """The .deb of `package` at the version installed in the container, fetched on the host from the
    host's own mirrors for the container's release (a private apt state: the host's is not touched)."""
    version = box.run("dpkg-query", "-W", "-f=${Version}", package).stdout.strip()
    (into / "lists/partial").mkdir(parents=True)
    (into / "cache/archives/partial").mkdir(parents=True)
    (into / "sources.list").write_text("\n".join(harness.apt_sources(box.suite)) + "\n")
    apt = [
        *("-o", f"Dir::Etc::SourceList={into}/sources.list", "-o", "Dir::Etc::SourceParts=-"),
        *("-o", f"Dir::State::Lists={into}/lists", "-o", f"Dir::Cache={into}/cache"),
        *("-o", "Debug::NoLocking=1", "-qq"),
    ]
    harness.sh("apt-get", *apt, "update", timeout=300)
    fetched = subprocess.run(
        ["apt-get", *apt, "download", f"{package}={version}"],
        cwd=into,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if fetched.returncode != 0:
        pytest.skip(
            f"{package} {version} (the container's) is no longer on the mirror: {fetched.stderr[-300:]}"
        )
    [deb] = into.glob(f"{package}_*.deb")
    return deb


def test_reinstalled_interpreter_fires_the_trigger_and_the_worker_still_starts(
    configured: harness.Container, tmp_path: Path
) -> None:
    """python3.X is reinstalled under the venv (as a point release would replace it): dpkg runs the
    package's interpreter trigger, whose handler re-points the venv at it, and the worker starts."""
    box = configured
    # bin/python and bin/python3 link to bin/python3.X, which links to the interpreter.
    python = box.run("readlink", "-f", "/opt/venvs/falcoria-worker/bin/python3").stdout.strip()
    assert re.fullmatch(r"/usr/bin/python3\.\d+", python), python
    triggers = box.path("/var/lib/dpkg/info/falcoria-worker.triggers").read_text()
    assert f"interest-noawait {python}" in triggers.splitlines(), triggers
    package = f"{Path(python).name}-minimal"  # the package that ships /usr/bin/python3.X
    assert box.run("dpkg", "-S", python).stdout.startswith(f"{package}:"), python
    deb = _download_installed(box, package, tmp_path)
    box.copy_in(deb, f"/root/{deb.name}")
    before = _invocations(box)
    reinstall = box.run("dpkg", "-i", f"/root/{deb.name}", timeout=300)
    assert "falcoria-worker: venv updated for Python" in reinstall.stdout, reinstall.stdout + reinstall.stderr
    assert box.run("readlink", "-f", "/opt/venvs/falcoria-worker/bin/python3").stdout.strip() == python
    box.run("/opt/venvs/falcoria-worker/bin/python3", "-c", "import falcoria_worker.cli")  # raises unless
    assert box.systemctl("restart", *INSTANCES, timeout=120).returncode == 0
    after = _invocations(box)
    for unit in INSTANCES:
        props = box.show(unit, "ActiveState", "SubState", "StatusText")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        assert after[unit] != before[unit], unit


def test_journal_is_readable_from_the_host(configured: harness.Container) -> None:
    for unit in INSTANCES:
        text = configured.host_journal("-u", unit, "-o", "cat")
        assert "falcoria-worker" in text, f"nothing of {unit} in the journal seen from the host"
    # The worker's own journal field tells the instances apart.
    assert configured.host_journal("INSTANCE=2", "_SYSTEMD_UNIT=falcoria-worker@2.service", "-o", "cat")


def test_watchdog_restarts_a_hung_worker(configured: harness.Container) -> None:
    """A worker that stops feeding the watchdog (SIGSTOP) is aborted and restarted by systemd.

    A runtime drop-in shortens WatchdogSec (60 s in the unit) so that this takes seconds."""
    box = configured
    unit = INSTANCES[1]
    dropin = f"/run/systemd/system/{unit}.d/fast-watchdog.conf"
    # Longer than an instance's start-up on a busy machine (systemd arms the watchdog at the fork, and
    # the Celery imports take seconds there), so only the SIGSTOP makes it fire.
    box.write(dropin, "[Service]\nWatchdogSec=15s\nTimeoutAbortSec=2s\n")
    box.systemctl("daemon-reload", check=True)
    try:
        box.systemctl("restart", unit, check=True)
        other = box.show(INSTANCES[0], "InvocationID", "MainPID")
        before = box.show(unit, "MainPID", "NRestarts")
        started = time.monotonic()
        box.run("kill", "-STOP", before["MainPID"])
        deadline = time.monotonic() + 90
        props = before
        while time.monotonic() < deadline:
            props = box.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
            if props["NRestarts"] != before["NRestarts"] and props["SubState"] == "running":
                break
            time.sleep(0.25)
        report(box.suite)[0]["watchdog (15 s) kill + restart until READY"] = time.monotonic() - started
        assert props["SubState"] == "running" and props["MainPID"] != before["MainPID"], (
            props,
            box.journal("-u", unit, "-n", "40", "-o", "short-monotonic"),
        )
        assert "Watchdog timeout" in box.journal("-u", unit, "-o", "cat")
        # the other instance kept working throughout
        assert box.show(INSTANCES[0], "InvocationID", "MainPID") == other
        assert box.systemctl("is-active", INSTANCES[0]).stdout.strip() == "active"
    finally:
        box.run("rm", "-rf", str(Path(dropin).parent))
        box.systemctl("daemon-reload")
        # The restarts above count towards the start limit too.
        box.systemctl("reset-failed", unit)
        box.systemctl("restart", unit)


def test_stopping_the_target_stops_every_instance_cleanly(configured: harness.Container) -> None:
    """SIGTERM to the main process only (KillMode=mixed); an idle worker exits well inside TimeoutStopSec.

    Instances are ordered Before= the target, so `systemctl stop falcoria-worker.target` returns once the
    target is down and the instances' stop jobs run on (prerm names the instances too, and so waits)."""
    box = configured
    since = box.run("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    started = time.monotonic()
    assert box.systemctl("stop", "falcoria-worker.target", timeout=120).returncode == 0
    for unit in INSTANCES:
        props = _wait_state(box, unit, {"inactive", "failed"}, timeout=35)
        assert (props["ActiveState"], props["Result"]) == ("inactive", "success"), f"{unit}: {props}"
    report(box.suite)[0]["stop @1+@2 through the target"] = time.monotonic() - started
    log = box.journal("-u", "falcoria-worker@*", "--since", since, "-o", "cat")
    assert "SIGKILL" not in log and "timed out" not in log, log
    box.systemctl("start", "falcoria-worker.target", timeout=120)  # enabled instances come back with it
    for unit in INSTANCES:
        assert box.systemctl("is-active", unit).stdout.strip() == "active", unit


def test_scan_with_the_units_sandbox_as_the_service_user(configured: harness.Container) -> None:
    """A SYN scan by `falcoria-worker scan` under the unit's own [Service] hardening (CAP_NET_RAW only,
    MemoryDenyWriteExecute, the system call filter, ...) finds exactly the target's open ports."""
    box = configured
    props = _sandbox_properties(box.run("cat", "/lib/systemd/system/falcoria-worker@.service").stdout)
    target, ports = next(iter(box.lab.targets.items()))
    probe = sorted({*ports, 443})
    args = [arg for prop in props for arg in ("-p", prop)]
    scan = box.run(
        "systemd-run",
        "--wait",
        "--pipe",
        "--quiet",
        *args,
        "-p",
        "WorkingDirectory=/tmp",
        "falcoria-worker",
        "scan",
        target,
        "--ports",
        ",".join(map(str, probe)),
        "--ports-opts",
        "-sS -n -Pn",
        "--no-services",
        "-o",
        "/tmp/report.xml",
        check=False,
    )
    assert scan.returncode == 0, scan.stdout + scan.stderr
    open_ports = {int(m[1]) for m in re.finditer(r"^(\d+)/tcp\s+open\b", scan.stdout, re.M)}
    assert open_ports == set(ports), scan.stdout


def _sandbox_properties(unit_text: str) -> list[str]:
    """The [Service] settings of the installed unit that shape the process (not its lifecycle)."""
    lifecycle = {
        "Type",
        "NotifyAccess",
        "ExecStart",
        "WatchdogSec",
        "Restart",
        "RestartSec",
        "RestartPreventExitStatus",
        "TimeoutStartSec",
        "TimeoutStopSec",
        "KillMode",
        "SyslogIdentifier",
    }
    section = unit_text.split("[Service]", 1)[1].split("\n[", 1)[0]
    props = []
    for line in section.splitlines():
        key, sep, _ = line.partition("=")
        if sep and not line.startswith("#") and key not in lifecycle and "%i" not in line:
            props.append(line)
    return props


# --- removal -------------------------------------------------------------------------------------------


def test_purge_leaves_only_the_user(box: harness.Container) -> None:
    box.run("apt-get", "purge", "-y", "falcoria-worker", timeout=300)
    # systemd may still list the instances as "not-found inactive" until it collects them; what matters is
    # that no unit file is left and nothing of them runs or failed.
    assert box.systemctl("list-unit-files", "--no-legend", "falcoria-worker*").stdout.strip() == ""
    lingering = box.systemctl(
        "list-units",
        "--no-legend",
        "--all",
        "--state=active,activating,deactivating,failed",
        "falcoria-worker*",
    ).stdout
    assert lingering.strip() == "", lingering
    assert box.run("pgrep", "-u", USER, check=False).returncode == 1, "processes of the user survived"
    left = box.shell(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /root \\) -prune -o -name '*falcoria*' -print",
        check=False,
    ).stdout.split()
    assert left == [], f"left behind after purge: {left}"
    assert (
        box.run("dpkg-statoverride", "--list", "/etc/falcoria-worker/worker.conf", check=False).returncode
        == 1
    )
    # Debian practice keeps system users on purge (files may still carry the uid).
    box.run("getent", "passwd", USER)
