"""A booted Debian with systemd as PID 1, for the system tests (the .deb, the units, the role).

    rootfs_tarball()   cached rootfs of SUITE (mmdebstrap), keyed by a hash of what goes into it
    Lab                bridge + container netns + target netns with listeners, all in SUBNET
    Container          unpack into a tmpfs, boot with systemd-nspawn, run commands inside, tear down

Layout (SUBNET = 10.250.100.0/24; nothing else is ever scanned):

    host   fwsys-br  10.250.100.1    Redis, RabbitMQ and the fake ScanLedger bind here (Lab.host_ip)
    netns  fwsys-c   10.250.100.10   the container (eth0), default route via .1
    netns  fwsys-t1  10.250.100.21   listeners on TARGET_PORTS[...21]
    netns  fwsys-t2  10.250.100.22   listeners on TARGET_PORTS[...22]

Each target's listeners log the source address of every connection they accept (Lab.peers).

The host has no systemd as PID 1 and no machined, so the container is booted with `--register=no
--keep-unit` and reached with nsenter (not machinectl). Its journal is persistent, so the host can also
read it with `journalctl -D <root>/var/log/journal`. The host keeps ip_forward=0: the namespaces reach
each other and the host's bridge address, never the outside.

The container runs Debian 12 (SUITE, bookworm) unless a suite= argument names another of SUITES (trixie:
Debian 13). The .deb installed in it must be built for the same release (scripts/build-deb --dist).

One system-test session at a time per machine: names and subnet are fixed so that leftovers of a
crashed run can be found and removed; an flock on LOCK_PATH serialises sessions.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("FW_ROOTFS_CACHE", "/var/cache/falcoria-worker-tests"))
LOCK_PATH = Path("/run/lock/falcoria-worker-systest.lock")
SUITES = ("bookworm", "trixie")
SUITE = SUITES[0]

# Everything the container needs, pre-installed, because its private network has no way out: systemd as
# init, nmap and the tools the tests use, the .deb's runtime dependencies (the release's python3.X,
# libsystemd0, systemd-sysusers from systemd), openssh-server and python3-apt for the Ansible role's tests.
ROOTFS_PACKAGES = (
    "dbus",
    "iproute2",
    "libcap2-bin",
    "nmap",
    "openssh-server",
    "procps",
    "python3",
    "python3-apt",
    "systemd",
    "systemd-sysv",
)
# Generic identity; Container.boot() writes the real machine name into /etc/hostname and /etc/hosts.
# An empty machine-id makes systemd create one at first boot; /var/log/journal makes the journal
# persistent (so the host can read it); apt's downloaded archives and lists are dropped (-100 MB).
_CUSTOMIZE_HOOKS = (
    'echo fwsys > "$1/etc/hostname"',
    'printf "127.0.0.1\\tlocalhost\\n127.0.1.1\\tfwsys\\n" > "$1/etc/hosts"',
    ': > "$1/etc/resolv.conf"; : > "$1/etc/machine-id"; mkdir -p "$1/var/log/journal"',
    'rm -f "$1"/var/cache/apt/archives/*.deb "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/*_Packages*',
)
HOST_TOOLS = {  # command -> Debian package that provides it
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "zstd": "zstd",
    "ip": "iproute2",
    "nsenter": "util-linux",
}

SUBNET = "10.250.100"
HOST_IP = f"{SUBNET}.1"
CONTAINER_IP = f"{SUBNET}.10"
BRIDGE = "fwsys-br"
CONTAINER_NETNS = "fwsys-c"
TARGET_PORTS: dict[str, tuple[int, ...]] = {f"{SUBNET}.21": (80, 2222), f"{SUBNET}.22": (443, 6379)}
MACHINE = "fwsys"
BOOT_TIMEOUT = 90.0

# The container's commands get a clean environment: nothing of pytest's or pyenv's leaks in.
_INSIDE_ENV = ("env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "TERM=dumb")


class HarnessError(RuntimeError):
    """The test machine could not be built, booted or reached."""


def _log(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


def sh(
    *cmd: str, check: bool = True, timeout: float = 120, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """Run a host command; on failure the error says what ran and what it printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


# --- host prerequisites --------------------------------------------------------------------------------


def missing_prerequisite() -> str | None:
    """Why the system tests cannot run here (None when they can). Installs missing host tools with apt."""
    if os.geteuid() != 0:
        return "system tests need root (network namespaces, tmpfs mounts, systemd-nspawn)"
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if shutil.which(cmd) is None})
    if missing:
        _log(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
        install = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            capture_output=True,
            env=env,
            check=False,
        )
        if update.returncode or install.returncode:
            return f"cannot install {', '.join(missing)} with apt-get: {install.stderr.decode()[-300:]}"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not available"
    return None


@contextlib.contextmanager
def session_lock(timeout: float = 600) -> Iterator[None]:
    """Hold the machine-wide system-test lock (fixed names and subnet allow one session at a time)."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_PATH.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HarnessError(f"another system-test session holds {LOCK_PATH}") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- rootfs --------------------------------------------------------------------------------------------


def apt_sources(suite: str = SUITE) -> list[str]:
    """The host's own Debian mirrors for `suite` as one-line entries for mmdebstrap (no mirror is
    hard-coded): scripts/apt-sources, which scripts/build-deb uses for its build roots too."""
    lines = sh(str(REPO / "scripts/apt-sources"), suite).stdout.splitlines()
    if not lines:
        raise HarnessError("no Debian sources found in /etc/apt/sources.list.d/debian.sources")
    return lines


def rootfs_key(packages: Sequence[str], suite: str = SUITE) -> str:
    """Cache key: what goes into the rootfs (suite, packages, hooks), not where it comes from."""
    recipe = "\n".join([suite, "minbase", *sorted(packages), *_CUSTOMIZE_HOOKS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def rootfs_tarball(
    extra_packages: Sequence[str] = (), timings: dict[str, float] | None = None, suite: str = SUITE
) -> Path:
    """The cached rootfs tarball for ROOTFS_PACKAGES + extra_packages; built with mmdebstrap on a miss."""
    packages = sorted({*ROOTFS_PACKAGES, *extra_packages})
    target = CACHE_DIR / f"rootfs-{suite}-{rootfs_key(packages, suite)}.tar.zst"
    if target.exists():
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Sessions side by side want the same image on a fresh machine: one builds it, the others wait.
    with (CACHE_DIR / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _build_rootfs(target, packages, suite, timings)
    return target


def _build_rootfs(
    target: Path, packages: Sequence[str], suite: str, timings: dict[str, float] | None
) -> None:
    started = time.monotonic()
    _log(f"building {target.name} with mmdebstrap (cache miss)")
    # Written next to the target and renamed: an interrupted build never looks like a cached one.
    # The .tar.zst name makes mmdebstrap write a zstd-compressed tarball with numeric owners.
    partial = CACHE_DIR / f"partial-{os.getpid()}-{target.name}"
    hooks = [f"--customize-hook={hook}" for hook in _CUSTOMIZE_HOOKS]
    try:
        sh(
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            *hooks,
            suite,
            str(partial),
            *apt_sources(suite),
            timeout=900,
        )
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    if timings is not None:
        timings["rootfs build (cold)"] = time.monotonic() - started


# --- network -------------------------------------------------------------------------------------------


def _netns_pids(name: str) -> list[int]:
    proc = sh("ip", "netns", "pids", name, check=False)
    return [int(pid) for pid in proc.stdout.split()]


def _delete_netns(name: str) -> None:
    """Remove a namespace of ours, first killing what still runs in it (listeners of a crashed run)."""
    if not Path(f"/run/netns/{name}").exists():
        return
    for pid in _netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    sh("ip", "netns", "del", name, check=False)


@dataclass
class Lab:
    """The bridge on the host, the container's netns and the target namespaces with their listeners."""

    host_ip: str = HOST_IP
    container_ip: str = CONTAINER_IP
    container_netns: str = CONTAINER_NETNS
    targets: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(TARGET_PORTS))
    _listeners: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _peers_dir: Path | None = field(default=None, repr=False)

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.container_netns}"

    def target_netns(self) -> list[str]:
        return [f"fwsys-t{i}" for i in range(1, len(self.targets) + 1)]

    def remove_leftovers(self) -> None:
        for name in [self.container_netns, *self.target_netns()]:
            _delete_netns(name)
        sh("ip", "link", "del", BRIDGE, check=False)

    def peers(self, ip: str) -> list[str]:
        """The source address of every connection the listeners of target `ip` accepted, in order."""
        assert self._peers_dir is not None, "the lab is not up"
        log = self._peers_dir / ip
        return log.read_text().splitlines() if log.exists() else []

    def up(self) -> None:
        self.remove_leftovers()
        peers = self._peers_dir = Path(tempfile.mkdtemp(prefix="fwsys-peers-"))
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        # Default route via the host so that the worker finds its source address (register-ip); with the
        # host's ip_forward=0 nothing is routed further.
        self._attach(self.container_netns, "fwsys-vc", self.container_ip, default_route=True)
        for index, (ip, ports) in enumerate(self.targets.items(), start=1):
            name = f"fwsys-t{index}"
            self._attach(name, f"fwsys-v{index}", ip, default_route=False)
            for port in ports:
                self._listen(name, ip, port, peers / ip)
        self._wait_listeners()

    def _attach(self, netns: str, host_end: str, ip: str, *, default_route: bool) -> None:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "link", "set", host_end, "master", BRIDGE, "up")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", netns, "link", "set", "eth0", "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        if default_route:
            sh("ip", "-n", netns, "route", "add", "default", "via", self.host_ip)

    def _listen(self, netns: str, ip: str, port: int, peers: Path) -> None:
        # tests.support.listeners survives the resets of SYN and version scans.
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                sys.executable,
                "-m",
                "tests.support.listeners",
                "--host",
                ip,
                "--port",
                str(port),
                "--banner",
                f"fwsys {ip}:{port}",
                "--peers",
                str(peers),
            ],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._listeners.append(proc)

    def _wait_listeners(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        for index, (ip, ports) in enumerate(self.targets.items(), start=1):
            for port in ports:
                while (
                    sh(
                        "ip",
                        "netns",
                        "exec",
                        f"fwsys-t{index}",
                        "ss",
                        "-Htln",
                        f"src {ip}:{port}",
                        check=False,
                    ).stdout.strip()
                    == ""
                ):
                    if time.monotonic() > deadline:
                        raise HarnessError(f"listener {ip}:{port} did not come up")
                    time.sleep(0.05)

    def down(self) -> None:
        for proc in self._listeners:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._listeners.clear()
        self.remove_leftovers()
        if self._peers_dir is not None:
            shutil.rmtree(self._peers_dir, ignore_errors=True)


# --- the container -------------------------------------------------------------------------------------


@dataclass
class Container:
    """A tmpfs copy of the cached rootfs, booted with systemd-nspawn into the lab's container netns."""

    tarball: Path
    lab: Lab
    workdir: Path
    machine: str = MACHINE
    timings: dict[str, float] = field(default_factory=dict)
    suite: str = SUITE  # the release the tarball holds
    leader: int = 0
    _nspawn: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    # lifecycle

    def boot(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        # tmpfs: unpacking onto this machine's disk takes 11-13 s, into RAM under a second.
        sh("mount", "-t", "tmpfs", "-o", "size=3G,mode=0755", f"{self.machine}-root", str(self.root))
        sh(
            "tar",
            "--numeric-owner",
            "--xattrs",
            "-I",
            "zstd",
            "-C",
            str(self.root),
            "-xf",
            str(self.tarball),
            timeout=300,
        )
        (self.root / "etc/hostname").write_text(f"{self.machine}\n")
        (self.root / "etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.machine}\n")
        self.timings["rootfs unpack (tmpfs)"] = time.monotonic() - started

        started = time.monotonic()
        with self.console_log.open("wb") as console:
            # --keep-unit: no host systemd to ask for a scope; --register=no: no machined.
            # --link-journal=no: the journal stays in the container's /var/log/journal, not the host's.
            self._nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    f"--directory={self.root}",
                    f"--machine={self.machine}",
                    "--register=no",
                    "--keep-unit",
                    "--console=read-only",
                    "--resolv-conf=off",
                    "--link-journal=no",
                    f"--network-namespace-path={self.lab.netns_path}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.leader = self._wait_leader()
        self._wait_running()
        self.timings["boot to running"] = time.monotonic() - started

    def _wait_leader(self, timeout: float = 20) -> int:
        assert self._nspawn is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise HarnessError(f"systemd-nspawn exited {self._nspawn.returncode}: {self._console_tail()}")
            # nspawn forks short-lived helpers too; the leader is the child that is PID 1 in its own
            # PID namespace ("NSpid: <host pid> 1").
            children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for pid in children.read_text().split():
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = next(
                        (line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), []
                    )
                    if nspid[-1:] == ["1"] and len(nspid) > 1:
                        return int(pid)
            time.sleep(0.02)
        raise HarnessError(f"no container leader after {timeout} s: {self._console_tail()}")

    def _wait_running(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state == "running":
                return
            if state == "degraded":
                failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
                raise HarnessError(f"container booted degraded; failed units:\n{failed}")
            time.sleep(0.1)
        raise HarnessError(f"container not running after {BOOT_TIMEOUT} s (state {state!r})")

    def _console_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def shutdown(self, timeout: float = 30) -> None:
        """Power off (SIGKILL to nspawn if that hangs), then drop the tmpfs."""
        if self._nspawn is not None and self._nspawn.poll() is None:
            self.run("systemctl", "--no-block", "poweroff", check=False)
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                _log(f"container did not power off in {timeout} s; killing systemd-nspawn")
                os.killpg(self._nspawn.pid, signal.SIGKILL)
                self._nspawn.wait(10)
        self._nspawn = None
        if os.path.ismount(self.root) and sh("umount", str(self.root), check=False).returncode != 0:
            sh("umount", "--lazy", str(self.root), check=False)

    # commands inside

    def run(
        self,
        *cmd: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces, clean environment)."""
        if not self.leader:
            raise HarnessError("container is not booted")
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", *_INSIDE_ENV, *cmd],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise HarnessError(f"inside: {' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def shell(
        self, script: str, *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, check=check, timeout=timeout)

    def systemctl(
        self, *args: str, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties of a unit as a dict."""
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props), check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        """journalctl inside the container (message text only unless args say otherwise)."""
        return self.run("journalctl", "--no-pager", "-q", *args, check=False).stdout

    def host_journal(self, *args: str) -> str:
        """The container's persistent journal read from the host (journalctl -D)."""
        self.run("journalctl", "--sync", check=False)
        return sh(
            "journalctl", "-D", str(self.root / "var/log/journal"), "--no-pager", "-q", *args, check=False
        ).stdout

    def path(self, inside: str) -> Path:
        """Host path of an absolute path inside the running container, through /proc/<leader>/root so that
        nspawn's own mounts (/run, /tmp, /dev) are the container's and not the unpacked tree's."""
        if not self.leader:
            raise HarnessError("container is not booted")
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def copy_in(self, src: Path, dest: str, mode: int = 0o644) -> str:
        """Copy a host file to an absolute path inside the container; returns that path."""
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        target.chmod(mode)
        return dest

    def write(self, dest: str, text: str, mode: int = 0o644) -> str:
        target = self.path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
        return dest

    def proc_status(self, pid: int) -> dict[str, str]:
        """/proc/<pid>/status of a process inside the container (pid as the container sees it)."""
        text = self.run("cat", f"/proc/{pid}/status").stdout
        return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


@contextlib.contextmanager
def booted(
    extra_packages: Sequence[str] = (), timings: dict[str, float] | None = None, suite: str = SUITE
) -> Iterator[Container]:
    """Cached rootfs -> lab network -> booted container; everything is removed again on the way out."""
    timings = {} if timings is None else timings
    started = time.monotonic()
    tarball = rootfs_tarball(extra_packages, timings, suite)
    if "rootfs build (cold)" not in timings:
        timings["rootfs reuse (cache hit)"] = time.monotonic() - started
    lab = Lab()
    workdir = Path(tempfile.mkdtemp(prefix="fwsys-"))
    container = Container(tarball=tarball, lab=lab, workdir=workdir, timings=timings, suite=suite)
    try:
        lab.up()
        container.boot()
        yield container
    finally:
        started = time.monotonic()
        try:
            container.shutdown()
        finally:
            lab.down()
            shutil.rmtree(workdir, ignore_errors=True)
        timings["teardown"] = time.monotonic() - started
