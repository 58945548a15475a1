"""The role test's nspawn machines (fleet.py) for tools that boot and remove them in separate steps, such
as molecule's create and destroy playbooks (ansible/roles/falcoria_worker/molecule/default):

    python -m tests.system.machines up STATE     boot; write STATE (JSON) and print molecule's instance
                                                 config (a YAML list) on stdout
    python -m tests.system.machines down STATE   power off, unmount, remove the network and STATE

The machines outlive `up` (systemd-nspawn runs in a session of its own); STATE keeps what `down` needs:
the work directory, and per machine its address, nspawn's PID and the container's leader. They use the
role test's network (fwrole-*), so they cannot run while tests/system/test_role.py does; `up` waits for
the system tests' lock while it boots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.system import fleet as fleet_mod
from tests.system import harness

POWEROFF_TIMEOUT = 30.0


def up(state: Path) -> None:
    with harness.session_lock():
        tarballs = fleet_mod.release_tarballs()
        fleet = fleet_mod.Fleet(workdir=Path(tempfile.mkdtemp(prefix="fwrole-molecule-")))
        try:
            fleet_mod._build_network()
            fleet.boot(tarballs)
        except BaseException:
            fleet.shutdown()
            fleet_mod._remove_network()
            raise
    machines = {
        name: {
            "ip": fleet.addresses[name],
            "leader": box.leader,
            "nspawn": box._nspawn.pid if box._nspawn else 0,
        }
        for name, box in fleet.machines.items()
    }
    state.write_text(json.dumps({"workdir": str(fleet.workdir), "key": str(fleet.key), "machines": machines}))
    instances = [
        {
            "instance": name,
            "address": info["ip"],
            "user": "root",
            "port": 22,
            "identity_file": str(fleet.key),
        }
        for name, info in machines.items()
    ]
    print(yaml.safe_dump(instances, sort_keys=False), end="")


def _gone(pid: int) -> bool:
    return pid == 0 or not Path(f"/proc/{pid}").exists()


def down(state: Path) -> None:
    if not state.exists():
        fleet_mod._remove_network()  # nothing booted by us is known; drop a leftover network only
        return
    saved = json.loads(state.read_text())
    workdir = Path(saved["workdir"])
    for name, info in saved["machines"].items():
        box = harness.Container(
            tarball=Path("/nonexistent"),
            lab=harness.Lab(),
            workdir=workdir / name,
            machine=name,
            leader=info["leader"],
        )
        if not _gone(info["leader"]):
            box.run("systemctl", "--no-block", "poweroff", check=False)
        deadline = time.monotonic() + POWEROFF_TIMEOUT
        while not _gone(info["nspawn"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _gone(info["nspawn"]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(info["nspawn"], signal.SIGKILL)
        box.shutdown()  # unmounts the tmpfs root
    fleet_mod._remove_network()
    shutil.rmtree(workdir, ignore_errors=True)
    state.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("state", type=Path)
    args = parser.parse_args()
    if harness.missing_prerequisite():
        sys.exit(f"cannot boot machines: {harness.missing_prerequisite()}")
    (up if args.action == "up" else down)(args.state)


if __name__ == "__main__":
    main()
