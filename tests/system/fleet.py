"""A small fleet for the Ansible role's system test: a Debian 12 and a Debian 13 container with systemd and
sshd, each in its own network namespace on one bridge, reached from the host over ssh as Ansible reaches
real hosts.

    Fleet      bridge + one netns per machine, an ssh key pair, the booted harness.Containers
    Playbook   runs ansible-playbook (ansible-core from this venv) against the fleet, parses the result

Layout (SUBNET = 10.250.120.0/24, apart from harness.py's 10.250.100.0/24 so both can run at once):

    host   fwrole-br   10.250.120.1    Redis and RabbitMQ bind here (Fleet.host_ip)
    netns  fwrole-a    10.250.120.11   container fwrole-a, Debian 12 (sshd on :22), default route via .1
    netns  fwrole-b    10.250.120.12   container fwrole-b, Debian 13

Booting, running commands inside and tearing down are harness.py's (Container); this module adds what
a fleet needs on top: more than one machine, sshd reachable from the host, and the playbook runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.system import harness

SUBNET = "10.250.120"
HOST_IP = f"{SUBNET}.1"
BRIDGE = "fwrole-br"
MACHINES = {"fwrole-a": f"{SUBNET}.11", "fwrole-b": f"{SUBNET}.12"}
RELEASES = {"fwrole-a": "bookworm", "fwrole-b": "trixie"}  # the role is tested on Debian 12 and 13
ANSIBLE_DIR = harness.REPO / "ansible"
SSH_TIMEOUT = 30.0


def _log(message: str) -> None:
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


# --- network ------------------------------------------------------------------------------------------------


def _remove_network() -> None:
    """Drop our namespaces and bridge, also those a crashed run left behind."""
    for index, name in enumerate(MACHINES, start=1):
        if Path(f"/run/netns/{name}").exists():
            harness.sh("ip", "netns", "del", name, check=False)
        # The kernel frees a namespace (and with it the veth pair) only once nothing refers to it any
        # more; deleting our end removes the pair at once.
        if Path(f"/sys/class/net/{_veth(index)}").exists():
            harness.sh("ip", "link", "del", _veth(index), check=False)
    harness.sh("ip", "link", "del", BRIDGE, check=False)


def _veth(index: int) -> str:
    return f"fwrole-v{index}"


def _build_network() -> None:
    _remove_network()
    harness.sh("ip", "link", "add", BRIDGE, "type", "bridge")
    harness.sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
    harness.sh("ip", "link", "set", BRIDGE, "up")
    for index, (name, ip) in enumerate(MACHINES.items(), start=1):
        veth = _veth(index)
        harness.sh("ip", "netns", "add", name)
        harness.sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        harness.sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        harness.sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
        harness.sh("ip", "-n", name, "link", "set", "eth0", "up")
        harness.sh("ip", "-n", name, "link", "set", "lo", "up")
        # The default route gives Ansible's facts a default IPv4 address (the role's default WORKER_IP);
        # the host's ip_forward=0 routes nothing further.
        harness.sh("ip", "-n", name, "route", "add", "default", "via", HOST_IP)


# --- the fleet ----------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Booted machines by name, their addresses, and the key that logs in to them as root."""

    workdir: Path
    machines: dict[str, harness.Container] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=lambda: dict(MACHINES))
    host_ip: str = HOST_IP

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    def boot(self, tarballs: Mapping[str, Path]) -> None:
        """Boots each machine from the rootfs tarball of its release (RELEASES)."""
        harness.sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fwrole", "-f", str(self.key))
        public = self.key.with_suffix(".pub").read_text()
        for name, ip in self.addresses.items():
            # A Lab only to name the namespace the container joins; the network is ours (_build_network).
            lab = harness.Lab(host_ip=self.host_ip, container_ip=ip, container_netns=name, targets={})
            machine = harness.Container(
                tarball=tarballs[RELEASES[name]],
                lab=lab,
                workdir=self.workdir / name,
                machine=name,
                suite=RELEASES[name],
            )
            self.machines[name] = machine
            machine.boot()
            machine.write("/root/.ssh/authorized_keys", public, mode=0o600)
            (machine.root / "root/.ssh").chmod(0o700)
        for name, ip in self.addresses.items():
            self._wait_ssh(name, ip)

    def _wait_ssh(self, name: str, ip: str) -> None:
        deadline = time.monotonic() + SSH_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((ip, 22), timeout=1):
                return
            time.sleep(0.2)
        state = self.machines[name].systemctl("status", "ssh.service").stdout
        raise harness.HarnessError(f"sshd of {name} ({ip}) not reachable after {SSH_TIMEOUT} s:\n{state}")

    @property
    def control_dir(self) -> Path:
        """Where Ansible's ssh keeps its persistent master connections (ControlPersist)."""
        return self.workdir / "ssh-cp"

    def shutdown(self) -> None:
        # The ssh masters would otherwise outlive the test by their ControlPersist time.
        for socket_path in self.control_dir.glob("*") if self.control_dir.exists() else ():
            harness.sh(
                "ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "fwrole", check=False, timeout=10
            )
        for machine in self.machines.values():
            try:
                machine.shutdown()
            except Exception as exc:  # the other machines must still go
                _log(f"shutdown of {machine.machine}: {exc}")

    def inventory(
        self, group_vars: Mapping[str, object], host_vars: Mapping[str, Mapping[str, object]] | None = None
    ) -> dict[str, object]:
        """A YAML-compatible (JSON) inventory: group falcoria_workers, machines in MACHINES order."""
        ssh_args = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        hosts = {
            name: {
                "ansible_host": ip,
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(self.key),
                "ansible_ssh_common_args": ssh_args,
                "ansible_python_interpreter": "/usr/bin/python3",
                **(host_vars or {}).get(name, {}),
            }
            for name, ip in self.addresses.items()
        }
        return {"falcoria_workers": {"hosts": hosts, "vars": dict(group_vars)}}


def release_tarballs(timings: dict[str, float] | None = None) -> dict[str, Path]:
    return {suite: harness.rootfs_tarball((), timings, suite) for suite in sorted(set(RELEASES.values()))}


@contextlib.contextmanager
def booted_fleet(timings: dict[str, float] | None = None) -> Iterator[Fleet]:
    """Cached rootfs -> bridge and namespaces -> booted machines with sshd; all removed on the way out."""
    timings = {} if timings is None else timings
    tarballs = release_tarballs(timings)
    fleet = Fleet(workdir=Path(tempfile.mkdtemp(prefix="fwrole-")))
    started = time.monotonic()
    try:
        _build_network()
        fleet.boot(tarballs)
        timings["fleet boot (2 machines, sshd up)"] = time.monotonic() - started
        yield fleet
    finally:
        fleet.shutdown()
        _remove_network()
        shutil.rmtree(fleet.workdir, ignore_errors=True)


# --- ansible-playbook ---------------------------------------------------------------------------------------

_RECAP = re.compile(
    r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)"
)
_HEADER = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?:[^:\]]+ : )?(.+?)\] \*+$")
_CHANGED = re.compile(r"^changed: \[([^\]]+)\]")


@dataclass
class Result:
    """One ansible-playbook run: exit status, output, recap per host, changed task names per host."""

    rc: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]]
    changed_tasks: dict[str, list[str]]

    def changed(self, host: str) -> int:
        return self.recap[host]["changed"]


def parse(output: str) -> tuple[dict[str, dict[str, int]], dict[str, list[str]]]:
    """Recap numbers and, per host, the names of the tasks that reported a change (default callback)."""
    recap: dict[str, dict[str, int]] = {}
    changed: dict[str, list[str]] = {}
    task = ""
    for line in output.splitlines():
        if header := _HEADER.match(line):
            task = header.group(1)
        elif hit := _CHANGED.match(line):
            names = changed.setdefault(hit.group(1), [])
            if task not in names:
                names.append(task)
        elif row := _RECAP.match(line):
            keys = ("ok", "changed", "unreachable", "failed", "skipped")
            recap[row.group(1)] = dict(zip(keys, map(int, row.groups()[1:]), strict=True))
    return recap, changed


@dataclass
class Playbook:
    """Runs ansible/site.yml (or another playbook) against a fleet with given variables."""

    fleet: Fleet
    playbook: Path = ANSIBLE_DIR / "site.yml"

    def run(
        self,
        group_vars: Mapping[str, object],
        *args: str,
        host_vars: Mapping[str, Mapping[str, object]] | None = None,
        timeout: float = 600,
    ) -> Result:
        """ansible-playbook with the variables as inventory group and host variables (as a real inventory
        has them: an extra var would override every host's own value)."""
        inventory = self.fleet.workdir / "inventory.json"
        # Written 0600: the group variables hold the broker and Redis passwords.
        inventory.touch(mode=0o600)
        inventory.write_text(json.dumps(self.fleet.inventory(group_vars, host_vars)))
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_NOCOLOR": "1",
            # Pipelining: one ssh round trip per task instead of three.
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_LOCAL_TEMP": str(self.fleet.workdir / "ansible-tmp"),
            "ANSIBLE_HOME": str(self.fleet.workdir / "ansible-home"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.fleet.control_dir),
        }
        cmd = [str(bin_dir / "ansible-playbook"), "-i", str(inventory), *args, str(self.playbook)]
        started = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            # What it printed up to then says where it hung.
            stdout, stderr = (
                part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                for part in (exc.stdout, exc.stderr)
            )
            raise harness.HarnessError(
                f"ansible-playbook timed out after {timeout} s:\n{stdout[-6000:]}{stderr[-2000:]}"
            ) from None
        seconds = time.monotonic() - started
        output = proc.stdout + proc.stderr
        recap, changed = parse(proc.stdout)
        return Result(proc.returncode, output, seconds, recap, changed)


def hosts_in(result: Result, names: Sequence[str]) -> list[str]:
    """The names of the hosts that appear in a run's recap (a host of a batch never started is absent)."""
    return [name for name in names if name in result.recap]
