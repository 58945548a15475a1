"""Case 13: silent partitions. Instance A runs in a network namespace of its own and reaches Redis,
RabbitMQ and ScanLedger through the lab's bridge; nftables inside that namespace drops (not refuses) its
packets to one of them.
(a) Redis, mid-scan, for longer than twice LEASE_TTL: A fences itself (stops nmap, keeps no report, says so
in its log and STATUS) before its lease can be requeued; instance B requeues the expired lease and scans
the task; ScanLedger receives the report once.
(b) RabbitMQ, mid-scan, past the AMQP heartbeat: A says so in STATUS and keeps its scan and lease.
(c) ScanLedger, while the finished report uploads, past SCANLEDGER_TIMEOUT: the upload times out off the
loop, the report waits in the spool (log, STATUS, status) and arrives once after healing.
In each, the watchdog is fed throughout, and after healing nothing is lost, duplicated or leaked and the
instances serve."""

from __future__ import annotations

import contextlib
import itertools
import json
import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.reliability.kit import (
    Figures,
    ProcessWatch,
    Run,
    first_status_at,
    leaked_keys,
    nmap_tasks_of,
    statuses_between,
    wait_clean,
    wait_served,
)
from tests.support.drive import scan_fields, wait_until
from tests.support.netns import HELD_PORT, Forwarder, namespace_on
from tests.support.services import _free_ports

pytestmark = pytest.mark.reliability

LEASE_TTL = "6"  # the drop lasts until B has taken over: at least 2 x LEASE_TTL by construction
# The unit's: a call into dropped packets holds the loop (a Redis call 5 s + a 2 s reconnect, a broker
# connect two attempts of 5 s), which must fit, with the ping interval (half of it), inside it.
WATCHDOG_SEC = 60
AMQP_HEARTBEAT = 30.0  # s, broker.connect's
# A connect to a silent broker holds the loop for two attempts of 5 s: its leases go unrenewed meanwhile,
# so LEASE_TTL must stay well above that, as the default 60 s does (6 s would fence the scan).
BROKER_CASE_LEASE_TTL = "30"
# SCANLEDGER_TIMEOUT of the ScanLedger case: each connect into the dropped packets gives up after it.
UPLOAD_TIMEOUT = 3


def longest_watchdog_gap(worker, start: float, end: float) -> float:
    """The longest time without a WATCHDOG=1 between two instants: what systemd's watchdog measures."""
    pings = [at for at, line in list(worker.notify.messages) if line == "WATCHDOG=1"]
    before = [at for at in pings if at < start]
    moments = [*before[-1:], *(at for at in pings if start <= at <= end), end]
    return max(b - a for a, b in itertools.pairwise(moments))


@contextlib.contextmanager
def cut_off_namespace(netns_lab, redis_server, rabbitmq, scanledger) -> Iterator[tuple[str, dict]]:
    """A's namespace and the settings that reach the services through forwarders on the bridge."""
    with namespace_on(netns_lab, "fence", "f", 20) as (netns, _ip):
        base = _free_ports(3)
        forwards = [
            Forwarder(netns_lab.host_ip, base + i, port)
            for i, port in enumerate(
                (redis_server.port, rabbitmq.port, int(scanledger.url.rsplit(":", 1)[1]))
            )
        ]
        try:
            yield (
                netns,
                {
                    "REDIS_HOST": netns_lab.host_ip,
                    "REDIS_PORT": str(base),
                    "RABBITMQ_HOST": netns_lab.host_ip,
                    "RABBITMQ_PORT": str(base + 1),
                    "BACKEND_BASE_URL": f"http://{netns_lab.host_ip}:{base + 2}",
                },
            )
        finally:
            for forward in forwards:
                forward.close()


def _drop(netns: str, host_ip: str, port: str) -> None:
    """Both ways, as a partition does: nothing is refused, nothing gets through."""
    rules = f"""
table inet partition {{
    chain output {{
        type filter hook output priority filter; policy accept;
        ip daddr {host_ip} tcp dport {port} drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr {host_ip} tcp sport {port} drop
    }}
}}
"""
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)


def _heal(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "partition"], check=True)


def test_redis_packets_dropped_past_the_lease_fence_the_scan(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    held_service,
    redis_server,
    rabbitmq,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    run = Run(tasker, scanledger, redis_server)
    with cut_off_namespace(netns_lab, redis_server, rabbitmq, scanledger) as (netns, reach):
        a = worker_factory("1", ledger=scanledger, hostname=f"fwpart-a-{secrets.token_hex(2)}", **reach)
        a.prefix = ("ip", "netns", "exec", netns)
        b = worker_factory("2", ledger=scanledger, hostname=f"fwpart-b-{secrets.token_hex(2)}")
        for worker in (a, b):
            worker.env["LEASE_TTL"] = LEASE_TTL
        a.env["WATCHDOG_USEC"] = str(WATCHDOG_SEC * 1_000_000)
        assert a.env["BACKEND_BASE_URL"] == reach["BACKEND_BASE_URL"]
        a.start()
        # Phase 2 of the held port waits until the test lets it go: A's scan cannot end by itself.
        task_id = run.send(scan_fields(held_service.target, str(HELD_PORT)))
        wait_until(lambda: task_id in nmap_tasks_of(a).values(), timeout=60, what="A scanning the task")
        b.start()

        cut = time.monotonic()
        _drop(netns, netns_lab.host_ip, reach["REDIS_PORT"])
        figures.faults["Redis packets dropped past 2 x LEASE_TTL"] += 1
        wait_until(lambda: "fenced: lease not renewed" in a.log(), timeout=60, what="A fencing itself")
        first_status_at(a, lambda text: "fenced" in text, cut)
        wait_until(lambda: not nmap_tasks_of(a), timeout=30, what="A's nmap stopped")
        # B requeues the lease once it has been expired for a whole TTL, and runs the task itself.
        wait_until(lambda: task_id in nmap_tasks_of(b).values(), timeout=90, what="B taking the task over")
        held_service.release()
        run.wait_delivered(timeout=120)

        healed = time.monotonic()
        gap = longest_watchdog_gap(a, cut, healed)
        figures.notes.append(f"A cut off {healed - cut:.0f} s; longest watchdog gap {gap:.1f} s")
        assert gap < WATCHDOG_SEC, f"systemd would have restarted A: {gap:.1f} s without WATCHDOG=1"
        _heal(netns)
        first_status_at(a, lambda text: "Redis" not in text and "fenced" not in text, healed)
        wait_clean(tasker, redis_server.client())
        time.sleep(2)  # room for a wrong second upload (A's spool, or a second requeue)
        run.settle(figures, watch)
        assert run.states()[task_id]["state"] == "completed", run.states()
        assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
        assert figures.parallel_runs == 0, watch.parallel
        assert leaked_keys(tasker, redis_server.client()) == []
        assert list(a.state_dir.glob("spool/pending/*")) == []  # A kept no report of the task
        wait_served(
            tasker, [a.nodename, b.nodename], redis_server, scan_fields(netns_lab.services, "80"), scanledger
        )
        for worker in (a, b):
            assert worker.alive() and worker.exits == []
            assert "Traceback" not in worker.log()
        a.stop()  # before its namespace and forwarders go


def test_rabbitmq_packets_dropped_are_noticed_and_the_scan_goes_on(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    held_service,
    redis_server,
    rabbitmq,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    """A's packets to and from RabbitMQ dropped mid-scan: A notices within about two AMQP heartbeats
    (30 s each; py-amqp gives up after two missed), says so in STATUS until it is back, and keeps its scan
    and its lease through Redis, so B never takes the task over; after healing the task is delivered
    once."""
    run = Run(tasker, scanledger, redis_server)
    with cut_off_namespace(netns_lab, redis_server, rabbitmq, scanledger) as (netns, reach):
        a = worker_factory("1", ledger=scanledger, hostname=f"fwpart-a-{secrets.token_hex(2)}", **reach)
        a.prefix = ("ip", "netns", "exec", netns)
        b = worker_factory("2", ledger=scanledger, hostname=f"fwpart-b-{secrets.token_hex(2)}")
        a.env["WATCHDOG_USEC"] = str(WATCHDOG_SEC * 1_000_000)
        for worker in (a, b):
            worker.env["LEASE_TTL"] = BROKER_CASE_LEASE_TTL
        a.start()
        task_id = run.send(scan_fields(held_service.target, str(HELD_PORT)))
        wait_until(lambda: task_id in nmap_tasks_of(a).values(), timeout=60, what="A scanning the task")
        b.start()

        cut = time.monotonic()
        _drop(netns, netns_lab.host_ip, reach["RABBITMQ_PORT"])
        figures.faults["RabbitMQ packets dropped past the AMQP heartbeat"] += 1

        def says_outage(text: str) -> bool:
            return text.startswith("reconnecting to RabbitMQ")

        noticed = first_status_at(a, says_outage, cut, timeout=180)
        # The partition outlasts the AMQP heartbeat, as a real one does, while A keeps trying.
        time.sleep(max(0.0, AMQP_HEARTBEAT + 5 - (time.monotonic() - cut)))
        assert task_id in nmap_tasks_of(a).values()  # the scan goes on: its lease lives through Redis
        healed = time.monotonic()
        gap = longest_watchdog_gap(a, cut, healed)
        figures.notes.append(
            f"cut off {healed - cut:.0f} s, noticed after {noticed - cut:.0f} s; watchdog gap {gap:.1f} s"
        )
        assert gap < WATCHDOG_SEC, f"systemd would have restarted A: {gap:.1f} s without WATCHDOG=1"
        lies = [text for text in statuses_between(a, noticed, healed) if not says_outage(text)]
        assert lies == [], f"A's STATUS while cut off from RabbitMQ: {lies}"
        _heal(netns)
        first_status_at(a, lambda text: not says_outage(text), healed, timeout=120)
        held_service.release()
        run.wait_delivered(timeout=120)
        wait_clean(tasker, redis_server.client())
        time.sleep(2)  # room for a wrong second upload
        run.settle(figures, watch)
        assert run.states()[task_id]["state"] == "completed", run.states()
        assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
        assert figures.parallel_runs == 0, watch.parallel
        assert watch.nmap_tasks[task_id] == {str(a.state_dir)}  # B never took it over
        assert "lease lost" not in a.log() and "fenced" not in a.log()
        assert leaked_keys(tasker, redis_server.client()) == []
        wait_served(
            tasker, [a.nodename, b.nodename], redis_server, scan_fields(netns_lab.services, "80"), scanledger
        )
        for worker in (a, b):
            assert worker.alive() and worker.exits == []
            assert "Traceback" not in worker.log()
        a.stop()


def test_scanledger_packets_dropped_during_the_upload_keep_the_report_in_the_spool(
    tasker,
    worker_factory,
    scanledger,
    netns_lab,
    held_service,
    redis_server,
    rabbitmq,
    watch: ProcessWatch,
    figures: Figures,
) -> None:
    """A's packets to and from ScanLedger dropped while its scan ends: the upload of the finished report
    runs into the silence and times out (on the delivery thread: A's loop keeps answering pings and
    feeding its watchdog), the report waits in A's spool, said so in the log, STATUS, the task's status
    (`delivery` pending) and the status file; after healing ScanLedger receives it once."""
    run = Run(tasker, scanledger, redis_server)
    with cut_off_namespace(netns_lab, redis_server, rabbitmq, scanledger) as (netns, reach):
        a = worker_factory(
            "1",
            ledger=scanledger,
            hostname=f"fwpart-a-{secrets.token_hex(2)}",
            SCANLEDGER_TIMEOUT=str(UPLOAD_TIMEOUT),
            UPLOAD_BACKOFF_MAX="3",  # the retry after healing comes soon; the count is what is asserted
            **reach,
        )
        a.prefix = ("ip", "netns", "exec", netns)
        a.env["WATCHDOG_USEC"] = str(WATCHDOG_SEC * 1_000_000)
        a.start()
        task_id = run.send(scan_fields(held_service.target, str(HELD_PORT)))
        wait_until(lambda: task_id in nmap_tasks_of(a).values(), timeout=60, what="A scanning the task")

        cut = time.monotonic()
        _drop(netns, netns_lab.host_ip, reach["BACKEND_BASE_URL"].rsplit(":", 1)[1])
        figures.faults["ScanLedger packets dropped past SCANLEDGER_TIMEOUT during the upload"] += 1
        held_service.release()  # the scan ends; its report's upload meets the dropped packets
        wait_until(lambda: run.states()[task_id].get("state") == "completed", timeout=60, what="scan ended")
        assert run.states()[task_id].get("delivery") == "pending", run.states()
        # The loop is free while the upload hangs on its socket: A answers a Celery ping.
        wait_until(lambda: a.nodename in tasker.ping(timeout=1.0), timeout=30, what="A answering ping")
        timed_out = "spool: ScanLedger unavailable (ScanLedger unreachable: ConnectTimeout"
        wait_until(lambda: timed_out in a.log(), timeout=120, what="A's upload timing out")
        assert "1 pending, next try in" in a.log()
        waiting = first_status_at(a, lambda text: "1 report spooled: ScanLedger unavailable" in text, cut)
        assert len(list(a.state_dir.glob("spool/pending/*"))) == 1  # kept, not lost
        assert json.loads((a.state_dir / "status.json").read_text())["spool"]["pending"] == 1
        assert run.uploads_per_task()[task_id] == 0  # nothing got through the partition

        healed = time.monotonic()
        gap = longest_watchdog_gap(a, cut, healed)
        figures.notes.append(f"A cut off {healed - cut:.0f} s; longest watchdog gap {gap:.1f} s")
        assert gap < WATCHDOG_SEC, f"systemd would have restarted A: {gap:.1f} s without WATCHDOG=1"
        _heal(netns)
        run.wait_delivered(timeout=120)
        wait_until(
            lambda: run.states()[task_id].get("delivery") == "delivered", timeout=30, what="delivery recorded"
        )
        first_status_at(a, lambda text: "spooled" not in text, healed)
        lies = [text for text in statuses_between(a, waiting, healed) if "spooled" not in text]
        assert lies == [], f"A's STATUS while its report waited: {lies}"
        wait_clean(tasker, redis_server.client())
        time.sleep(2)  # room for a wrong second upload
        run.settle(figures, watch)
        assert figures.lost == 0 and figures.duplicated == 0, run.uploads_per_task()
        assert figures.parallel_runs == 0, watch.parallel
        assert leaked_keys(tasker, redis_server.client()) == []
        assert list(a.state_dir.glob("spool/pending/*")) == []
        wait_served(tasker, [a.nodename], redis_server, scan_fields(netns_lab.services, "80"), scanledger)
        assert a.alive() and a.exits == []
        assert "Traceback" not in a.log()
        a.stop()
