"""Case 7: a hung instance (SIGSTOP in the middle of a scan) is killed and restarted by systemd's watchdog,
and its task is completed and uploaded exactly once. Also the journal parts of cases 6 and 8: a refused
task's reason is in the journal under its TASK_ID, and no secret is anywhere in the units' journal.

The .deb runs under its own unit in a booted Debian 12 (tests/system/harness.py). The machine is booted
by a module-scoped fixture here, not by tests/system's session fixtures: those hold the machine-wide
system-test lock for the whole session, so a second copy of them would wait on the first. This module
takes the lock, boots, and releases both before tests/system starts."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fakes.scanledger import FakeScanLedger
from tests.reliability.kit import Figures, leaked_keys
from tests.support.drive import status, wait_until
from tests.support.services import RabbitMQ, RedisServer, service_pair
from tests.support.tasker import Tasker
from tests.system import harness
from tests.system.conftest import deb_for

# The machine fixture builds the package and, on a fresh machine, the rootfs: minutes on 2 busy cores.
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

UNIT = "falcoria-worker@1.service"
DEB_INSIDE = "/root/falcoria-worker.deb"


@dataclass
class Machine:
    box: harness.Container
    redis_server: RedisServer
    rabbitmq: RabbitMQ
    ledger: FakeScanLedger


@pytest.fixture(scope="module")
def machine(services_run_dir: Path) -> Iterator[Machine]:
    reason = harness.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    deb = deb_for(harness.SUITE)
    with (
        harness.session_lock(),
        harness.booted() as box,
        service_pair(services_run_dir, ("127.0.0.1", box.lab.host_ip)) as (redis_server, broker),
    ):
        ledger = FakeScanLedger(host=box.lab.host_ip)
        ledger.token = ledger.add_token()
        ledger.start()
        try:
            box.copy_in(deb, DEB_INSIDE)
            box.run("apt-get", "install", "-y", DEB_INSIDE, timeout=300)
            host = box.lab.host_ip
            with box.path("/etc/falcoria-worker/worker.conf").open("a") as conf:
                conf.write(
                    f"\nRABBITMQ_HOST={host}\nRABBITMQ_PORT={broker.port}\nRABBITMQ_USER={broker.user}\n"
                    f"RABBITMQ_VHOST={broker.vhost}\nREDIS_HOST={host}\nREDIS_PORT={redis_server.port}\n"
                    f"REDIS_DB={redis_server.db}\nBACKEND_BASE_URL={ledger.url}\nLEASE_TTL=6\nLOGGER_LEVEL=DEBUG\n"
                )
            creds = "/etc/falcoria-worker/credentials"
            box.write(f"{creds}/worker_backend_token", ledger.token, mode=0o600)
            box.write(f"{creds}/rabbitmq_password", broker.password, mode=0o600)
            box.write(f"{creds}/redis_pass", redis_server.password, mode=0o600)
            # A short watchdog (60 s in the unit) so that the hang is noticed in seconds.
            box.write(f"/run/systemd/system/{UNIT}.d/fast-watchdog.conf", "[Service]\nWatchdogSec=4s\n")
            box.systemctl("daemon-reload", check=True)
            box.systemctl("start", UNIT, check=True, timeout=120)
            yield Machine(box, redis_server, broker, ledger)
        finally:
            ledger.stop()


def _props(box: harness.Container) -> dict[str, str]:
    return box.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")


def test_hung_instance_is_restarted_and_its_task_completed_once(machine: Machine, figures: Figures) -> None:
    box, ledger = machine.box, machine.ledger
    tasker = Tasker(machine.rabbitmq, machine.redis_server.client())
    try:
        target, ports = next(iter(box.lab.targets.items()))
        project = ledger.add_project()
        port_list = ",".join(map(str, ports))
        # About 8 s of phase 1 (40 probes 200 ms apart), then phase 1's open ports only.
        task_id = tasker.send_scan(
            ip=target,
            project=uuid.UUID(project),
            mode="append",
            open_ports_opts=f"-n -Pn --max-retries 1 --scan-delay 200ms -p 1-38,{port_list}",
            include_services=False,
            open_ports_str=f"1-38 {port_list.replace(',', ' ')}",
        )
        assert task_id is not None
        wait_until(lambda: _props(box)["StatusText"].startswith("scanning"), timeout=60, what="the scan")
        before = _props(box)
        box.run("kill", "-STOP", before["MainPID"])
        figures.faults["SIGSTOP of the main process mid-scan"] += 1
        wait_until(
            lambda: (p := _props(box))["NRestarts"] != before["NRestarts"] and p["SubState"] == "running",
            timeout=60,
            what="systemd's restart",
        )
        assert "Watchdog timeout" in box.journal("-u", UNIT, "-o", "cat")
        ledger.wait_for(lambda f: any(u.project == project for u in f.uploads), timeout=120)
        wait_until(
            lambda: status(machine.redis_server, task_id).get("state") == "completed", timeout=60, what="done"
        )
        time.sleep(2)  # room for a wrong second upload
        uploads = sum(1 for u in ledger.uploads if u.project == project)
        figures.tasks, figures.duplicated, figures.lost = 1, max(0, uploads - 1), int(uploads == 0)
        assert uploads == 1
        r = machine.redis_server.client()
        wait_until(lambda: leaked_keys(tasker, r) == [], timeout=30, what="Redis clean")
        figures.leaked_keys = len(leaked_keys(tasker, r))

        # Journal part of case 6: a refused task's reason, under its TASK_ID.
        refused = tasker.send_scan(
            ip=target, project=uuid.uuid4(), service_opts="-sV --script vuln", open_ports_str="80"
        )
        wait_until(lambda: status(machine.redis_server, refused).get("state") == "failed", what="refusal")
        assert "--script" in box.journal(f"TASK_ID={refused}", "-o", "cat")
        # Journal part of case 8: every field of every record of the unit, secrets nowhere.
        journal = box.journal("-u", UNIT, "-o", "verbose")
        secrets = {
            "WORKER_BACKEND_TOKEN": ledger.token,
            "RABBITMQ_PASSWORD": machine.rabbitmq.password,
            "REDIS_PASS": machine.redis_server.password,
        }
        assert [name for name, value in secrets.items() if value and value in journal] == []
    finally:
        tasker.close()
