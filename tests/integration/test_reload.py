"""`systemctl reload` (SIGHUP) of a running worker: new settings for the next task, running scans go on."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from tests.support.drive import scan_fields, slow_phase2, status, wait_phase, wait_until
from tests.support.tasker import Tasker

pytestmark = pytest.mark.integration


@pytest.fixture
def tasker(clean_broker, redis_server) -> Iterator[Tasker]:
    redis_server.flush()
    t = Tasker(clean_broker, redis_server.client())
    yield t
    t.close()


def test_reload_during_a_scan_applies_to_the_next_task_and_refuses_a_bad_config(
    tasker, worker_factory, scanledger, netns_lab, redis_server, tmp_path
) -> None:
    conf = tmp_path / "reloaded.conf"
    conf.write_text("# filled in during the test\n")
    worker = worker_factory(ledger=scanledger, args=("--config", str(conf))).start()
    project = uuid.UUID(scanledger.project)
    target = netns_lab.services.ip
    first = tasker.send_scan(**slow_phase2(netns_lab.services), project=project, mode="append")
    wait_phase(redis_server, first, "service_scan", worker)

    conf.write_text(f"SCOPE_DENY={target}/32\nNODE_NAME=renamed-by-reload\n")
    worker.reload()
    wait_until(lambda: "configuration reloaded" in worker.log(), what="reload")
    assert "NODE_NAME changed but take effect only at a restart" in worker.log()
    # The scan running at the reload finishes as it started, once.
    scanledger.wait_for(lambda f: len(f.uploads) == 1, timeout=120)
    wait_until(lambda: status(redis_server, first).get("state") == "completed", what="first task completed")

    # The next task meets the new scope; the instance kept its name.
    second = tasker.send_scan(**scan_fields(netns_lab.services, "80"), project=project)
    wait_until(lambda: status(redis_server, second).get("state") == "failed", what="refused by the new scope")
    assert "SCOPE_DENY" in status(redis_server, second)["error"]
    assert status(redis_server, second)["worker"] == worker.nodename

    conf.write_text("SCOPE_DENY=not-a-network\n")
    worker.reload()
    worker.notify.wait_for(lambda line: line.startswith("STATUS=") and "reload refused: SCOPE_DENY" in line)
    assert "configuration not reloaded, the previous one stays in force" in worker.log()
    assert worker.alive()
    third = tasker.send_scan(**scan_fields(netns_lab.services, "80"), project=project)
    wait_until(lambda: status(redis_server, third).get("state") == "failed", what="the old scope still holds")

    conf.write_text("")  # a good configuration again: the scope opens, STATUS forgets the refusal
    worker.reload()
    wait_until(lambda: worker.log().count("configuration reloaded") == 2, what="second reload")
    fourth = tasker.send_scan(**scan_fields(netns_lab.services, "80"), project=project, mode="append")
    wait_until(lambda: status(redis_server, fourth).get("state") == "completed", what="scanned again")
    wait_until(lambda: "reload refused" not in worker.notify.statuses()[-1], what="STATUS forgot")
    time.sleep(0.5)
    assert len(scanledger.uploads) == 2
    assert worker.alive()
