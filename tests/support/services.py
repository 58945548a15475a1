"""Real Redis and RabbitMQ for the test suite, started and stopped by session fixtures.

Both run on random private ports (never 6379/5672/4369/25672) bound to 127.0.0.1, with random passwords and
a unique RabbitMQ node name, in a per-run directory under FW_TEST_SERVICES_ROOT (default
/tmp/falcoria-test-services; not pytest's tmp dir, which is mode 0700 and closed to the `rabbitmq` user that
Debian's wrappers switch to). Every PID we start is recorded with its kernel start time in the run directory;
the next session stops whatever a crashed run left behind (only processes whose PID *and* start time match,
so a reused PID is never signalled) and removes its directory.

Fixtures:
  redis_server  (session)   RedisServer: host, port, password, db, url, client(), flush(),
                            stop()/start()/restart()
  rabbitmq      (session)   RabbitMQ: host, port, user, password, vhost, url(), connection(), rabbitmqctl(),
                            stop()/start()/restart()
  clean_broker  (function)  empties the test vhost (queues, exchanges, connections) before the test;
                            returns the rabbitmq handle
  tasker        (function)  tests.support.tasker.Tasker on a clean broker and an empty Redis

A test that needs TLS launches its own with `tls=ServerTLS(...)` (tests.support.tls): the server then also
listens with TLS on `tls_port`, while the plain port stays for the test's own tools (Tasker, readiness).

A test that needs the services reachable from another network namespace (a container on a bridge) starts
its own instance with `RedisServer.launch(..., bind=("127.0.0.1", "<bridge address>"))` or
`RabbitMQ.launch(..., bind=...)`; the address must already exist on the host.

The RabbitMQ test broker lowers `consumer_timeout` to FW_TEST_CONSUMER_TIMEOUT_MS (default 15000) and the
channel tick that enforces it to 1 s, so a consumer that holds a delivery too long is closed within seconds,
as a production broker would do after 30 minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import amqp
import pytest
import redis

from tests.support.tasker import Tasker
from tests.support.tls import ServerTLS

ROOT = Path(os.environ.get("FW_TEST_SERVICES_ROOT", "/tmp/falcoria-test-services"))
CONSUMER_TIMEOUT_MS = int(os.environ.get("FW_TEST_CONSUMER_TIMEOUT_MS", "15000"))
TEST_VHOST = "falcoria_test"
TEST_USER = "fwtest"
REDIS_DB = 3  # Tasker's default db (contract §3): tests see the same numbering as production

# Below the kernel's ephemeral range (32768+), so an outgoing connection never holds one of our ports, and
# away from every default port a developer's own broker or cache would use.
_PORT_LOW, _PORT_HIGH = 20000, 32000
_READY_TIMEOUT = 90.0


# --- process bookkeeping ------------------------------------------------------------------------------


def _start_time(pid: int) -> int | None:
    """Kernel start time of `pid` (clock ticks since boot), None when it is gone: a PID plus its start
    time names one process for good, whereas a bare PID may have been reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses; the fields after the last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _same_process(pid: int, start_time: int) -> bool:
    return _start_time(pid) == start_time


def _terminate(pid: int, start_time: int, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after `grace`, but only while (pid, start_time) is still that process."""
    if not _same_process(pid, start_time):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _same_process(pid, start_time):
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child, or it stays a zombie
        time.sleep(0.05)
    if _same_process(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Registry:
    """`pids.json` in a run directory: {name: [pid, start_time]} of every process this run started."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "pids.json"

    def _load(self) -> dict[str, list[int]]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def add(self, name: str, pid: int) -> None:
        start = _start_time(pid)
        if start is None:
            return
        entries = self._load()
        entries[name] = [pid, start]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        tmp.replace(self.path)

    def remove(self, name: str) -> None:
        entries = self._load()
        if entries.pop(name, None) is not None:
            self.path.write_text(json.dumps(entries))

    def terminate_all(self) -> None:
        for pid, start in self._load().values():
            _terminate(pid, start)


def _new_run_dir() -> Path:
    """A fresh directory for this pytest process, owned by it (owner.json), after sweeping dead runs."""
    ROOT.mkdir(mode=0o755, exist_ok=True)
    _sweep_leftovers()
    run_dir = ROOT / f"run-{os.getpid()}-{secrets.token_hex(4)}"
    run_dir.mkdir(mode=0o755)
    start = _start_time(os.getpid())
    (run_dir / "owner.json").write_text(json.dumps([os.getpid(), start]))
    return run_dir


def _sweep_leftovers() -> None:
    """Stop the services of runs whose pytest process is gone (crashed or killed) and delete their dirs.
    Runs of live pytest processes (another engineer's session) are left alone."""
    for run_dir in ROOT.glob("run-*"):
        try:
            owner_pid, owner_start = json.loads((run_dir / "owner.json").read_text())
        except (OSError, ValueError):
            owner_pid, owner_start = 0, None
        if owner_start is not None and _same_process(owner_pid, owner_start):
            continue
        _Registry(run_dir).terminate_all()
        shutil.rmtree(run_dir, ignore_errors=True)


def _port_free(port: int) -> bool:
    # Binding the wildcard address proves the port is free on every address, loopback included.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> int:
    """First port of `count` consecutive free ports in the private range."""
    for _ in range(200):
        base = secrets.randbelow(_PORT_HIGH - _PORT_LOW - count) + _PORT_LOW
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {_PORT_LOW}-{_PORT_HIGH}")


def _wait_tcp(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


# --- Redis ---------------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server child process with requirepass, no persistence (RDB only when asked to keep data)."""

    dir: Path
    port: int
    password: str = field(repr=False)
    bind: tuple[str, ...] = ("127.0.0.1",)
    db: int = REDIS_DB
    host: str = "127.0.0.1"
    tls: ServerTLS | None = None
    tls_port: int = 0
    start_seconds: float = 0.0  # wall time of the last start(), for the report
    _registry: _Registry | None = field(default=None, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def launch(
        cls, run_dir: Path, bind: Sequence[str] = ("127.0.0.1",), *, tls: ServerTLS | None = None
    ) -> RedisServer:
        # A directory of its own (mkdtemp: 0700): several servers may be launched in one session.
        work = Path(tempfile.mkdtemp(prefix="redis-", dir=run_dir))
        base = _free_ports(2)
        server = cls(
            dir=work,
            port=base,
            password=secrets.token_urlsafe(18),
            bind=tuple(bind),
            tls=tls,
            tls_port=base + 1 if tls else 0,
            _registry=_Registry(run_dir),
        )
        tls_lines = []
        if tls is not None:
            tls_lines = [
                f"tls-port {server.tls_port}",
                f"tls-cert-file {tls.cert}",
                f"tls-key-file {tls.key}",
                f"tls-ca-cert-file {tls.ca}",
                f"tls-auth-clients {'yes' if tls.require_client_cert else 'no'}",
            ]
        # The password goes to a 0600 config file, never to argv where `ps` and logs would show it.
        conf = work / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {server.port}",
                    f"bind {' '.join(server.bind)}",
                    f"requirepass {server.password}",
                    'save ""',
                    "appendonly no",
                    f"dir {work}",
                    "dbfilename dump.rdb",
                    f"logfile {work / 'redis.log'}",
                    "daemonize no",
                    *tls_lines,
                    "",
                ]
            )
        )
        conf.chmod(0o600)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/{self.db}"

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"decode_responses": True, "db": self.db}
        options.update(kwargs)
        return redis.Redis(host=self.host, port=self.port, password=self.password, **options)  # type: ignore[arg-type]

    def flush(self) -> None:
        """Empty every db, starting the server first if an earlier test stopped it and failed before
        starting it again (so one broken fault test does not fail every test after it)."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = None
            self.start()
        with self.client() as c:
            c.flushall()

    def start(self) -> None:
        began = time.monotonic()
        # Own session: a Ctrl-C aimed at pytest must not kill the server before the fixture stops it.
        self._proc = subprocess.Popen(
            ["redis-server", str(self.dir / "redis.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if self._registry:
            self._registry.add(f"redis-{self.port}", self._proc.pid)
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited {self._proc.returncode}:\n{_tail(self.dir / 'redis.log')}"
                )
            try:
                with self.client(socket_timeout=1) as c:
                    c.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.start_seconds = time.monotonic() - began

    def stop(self, *, keep_data: bool = False) -> None:
        """Shut the server down; with keep_data it writes dump.rdb first, which the next start() loads."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            if keep_data:
                with self.client(socket_timeout=30) as c:
                    c.save()
            # SIGTERM is redis' own clean shutdown, and with `save ""` it writes nothing. (SHUTDOWN over a
            # client makes redis-py retry the dropped connection with backoff: seconds lost per stop.)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if not keep_data:
            (self.dir / "dump.rdb").unlink(missing_ok=True)
        if self._registry:
            self._registry.remove(f"redis-{self.port}")
        self._proc = None

    def restart(self, *, keep_data: bool = False) -> None:
        self.stop(keep_data=keep_data)
        self.start()


# --- RabbitMQ ------------------------------------------------------------------------------------------


@dataclass
class RabbitMQ:
    """A detached RabbitMQ node (Debian's wrapper runs it as `rabbitmq`) with its own epmd."""

    dir: Path
    node: str
    port: int
    dist_port: int
    epmd_port: int
    password: str = field(repr=False)
    bind: tuple[str, ...] = ("127.0.0.1",)
    user: str = TEST_USER
    vhost: str = TEST_VHOST
    host: str = "127.0.0.1"
    tls: ServerTLS | None = None
    start_seconds: float = 0.0  # wall time of the last start(), for the report
    stop_seconds: float = 0.0
    _registry: _Registry | None = field(default=None, repr=False)
    _epmd: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def launch(
        cls, run_dir: Path, bind: Sequence[str] = ("127.0.0.1",), *, tls: ServerTLS | None = None
    ) -> RabbitMQ:
        # A directory of its own: several brokers may be launched in one session.
        work = Path(tempfile.mkdtemp(prefix="rabbitmq-", dir=run_dir))
        # Block: AMQP, distribution, epmd, then ten ports for the CLI tools' own distribution listeners
        # (their default range 35672-35682 would be shared with every other node on the machine), and the
        # TLS listener last.
        base = _free_ports(14)
        broker = cls(
            dir=work,
            node=f"fwtest-{secrets.token_hex(4)}@localhost",
            port=base,
            dist_port=base + 1,
            epmd_port=base + 2,
            password=secrets.token_urlsafe(18),
            bind=tuple(bind),
            tls=tls,
            _registry=_Registry(run_dir),
        )
        broker._write_config()
        broker.start()
        return broker

    def _write_config(self) -> None:
        self.dir.chmod(0o750)  # the rabbitmq user reads its config and writes mnesia and logs here
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir()
        listeners = [f"listeners.tcp.{i} = {addr}:{self.port}" for i, addr in enumerate(self.bind, 1)]
        if self.tls is not None:
            # Copies the `rabbitmq` user can read (the key may sit in a directory closed to it).
            for name in ("ca", "cert", "key"):
                shutil.copyfile(getattr(self.tls, name), self.dir / f"tls-{name}.pem")
            listeners += [f"listeners.ssl.{i} = {a}:{self.tls_port}" for i, a in enumerate(self.bind, 1)]
            listeners += [
                f"ssl_options.cacertfile = {self.dir / 'tls-ca.pem'}",
                f"ssl_options.certfile = {self.dir / 'tls-cert.pem'}",
                f"ssl_options.keyfile = {self.dir / 'tls-key.pem'}",
                f"ssl_options.verify = {'verify_peer' if self.tls.require_client_cert else 'verify_none'}",
                f"ssl_options.fail_if_no_peer_cert = {str(self.tls.require_client_cert).lower()}",
            ]
        # default_* create the vhost, user and permissions on the first boot of the fresh mnesia dir, which
        # saves three rabbitmqctl calls (about a second each) per session.
        (self.dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    *listeners,
                    "loopback_users = none",
                    f"consumer_timeout = {CONSUMER_TIMEOUT_MS}",
                    f"default_vhost = {self.vhost}",
                    f"default_user = {self.user}",
                    f"default_pass = {self.password}",
                    "default_user_tags.administrator = true",
                    "default_permissions.configure = .*",
                    "default_permissions.read = .*",
                    "default_permissions.write = .*",
                    "log.console = false",
                    "log.file.level = info",
                    "",
                ]
            )
        )
        # consumer_timeout is enforced on the channel tick (60 s by default): without a short tick a
        # 15 s timeout would fire anywhere between 15 and 75 s.
        (self.dir / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")  # no management plugin: faster boot
        (self.dir / "rabbitmq-env.conf").write_text("")  # shadow /etc/rabbitmq/rabbitmq-env.conf
        for path in self.dir.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        (self.dir / "rabbitmq.conf").chmod(0o600)

    @property
    def env(self) -> dict[str, str]:
        """Environment for rabbitmq-server and its CLI tools (Debian's wrapper passes it through su)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.dist_port + 2),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.dist_port + 11),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.pid_file),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            # The distribution listener binds 0.0.0.0 by default; keep it on loopback.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    @property
    def tls_port(self) -> int:
        return self.port + 13 if self.tls else 0

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbit.pid"

    def url(self, scheme: str = "amqp") -> str:
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{self.vhost}"

    def connection(self) -> amqp.Connection:
        """A connected py-amqp connection to the test vhost (the caller closes it)."""
        conn = amqp.Connection(
            f"{self.host}:{self.port}",
            userid=self.user,
            password=self.password,
            virtual_host=self.vhost,
            connect_timeout=10,
        )
        conn.connect()
        return conn

    def rabbitmqctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self._cli("rabbitmqctl", *args, check=check, timeout=timeout)

    def _cli(
        self, tool: str, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [tool, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
        return done

    def _start_epmd(self) -> None:
        if self._epmd is not None and self._epmd.poll() is None:
            return
        # We start epmd ourselves (in the foreground, as our child) so that teardown knows its PID; the
        # node finds it on ERL_EPMD_PORT and does not spawn a daemonised one of its own.
        self._epmd = subprocess.Popen(
            ["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if self._registry:
            self._registry.add(f"epmd-{self.port}", self._epmd.pid)
        _wait_tcp("127.0.0.1", self.epmd_port, 10)

    def start(self) -> None:
        began = time.monotonic()
        self._start_epmd()
        self._cli("rabbitmq-server", "-detached")
        waited = self._cli(
            "rabbitmq-diagnostics", "-q", "wait", str(self.pid_file), "--timeout", str(int(_READY_TIMEOUT)),
            check=False, timeout=_READY_TIMEOUT + 30,
        )  # fmt: skip
        if waited.returncode != 0:
            logs = "\n".join(_tail(p) for p in sorted((self.dir / "log").glob("*.log")))
            raise RuntimeError(f"RabbitMQ {self.node} did not start:\n{waited.stderr}\n{logs}")
        if self._registry:
            self._registry.add(f"rabbitmq-{self.port}", int(self.pid_file.read_text().strip()))
        # `wait` returns once the rabbit app runs; the listener and the default vhost/user are proven by
        # a real login.
        self.connection().close()
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Stop the node (the epmd stays up for a later start())."""
        began = time.monotonic()
        if self.pid_file.exists():
            # With the pid file, `stop` returns only after the OS process has exited.
            self.rabbitmqctl("-q", "stop", str(self.pid_file), check=False)
            self.pid_file.unlink(missing_ok=True)
        if self._registry:
            self._registry.remove(f"rabbitmq-{self.port}")
        self.stop_seconds = time.monotonic() - began

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and the epmd we started."""
        self.stop()
        if self._epmd is not None:
            self._epmd.terminate()
            try:
                self._epmd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._epmd.kill()
                self._epmd.wait()
            if self._registry:
                self._registry.remove(f"epmd-{self.port}")
            self._epmd = None

    def reset_vhost(self) -> None:
        """Delete the test vhost (its queues, exchanges and connections go with it) and recreate it with
        the test user's permissions, in a single CLI call."""
        vh = f'<<"{self.vhost}">>'
        self.rabbitmqctl(
            "eval",
            f'ok = rabbit_vhost:delete({vh}, <<"tests">>), '
            f'ok = rabbit_vhost:add({vh}, <<"tests">>), '
            f'ok = rabbit_auth_backend_internal:set_permissions(<<"{self.user}">>, {vh}, '
            f'<<".*">>, <<".*">>, <<".*">>, <<"tests">>).',
        )


@contextlib.contextmanager
def service_pair(run_dir: Path, bind: Sequence[str]) -> Iterator[tuple[RedisServer, RabbitMQ]]:
    """A Redis and a RabbitMQ listening on `bind` as well (a bridge address, for workers in containers),
    stopped again afterwards; each launch has a directory of its own, so pairs may share a run dir."""
    redis_server = RedisServer.launch(run_dir, bind=bind)
    try:
        broker = RabbitMQ.launch(run_dir, bind=bind)
    except BaseException:
        redis_server.stop()
        raise
    try:
        yield redis_server, broker
    finally:
        broker.close()
        redis_server.stop()


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def services_run_dir() -> Iterator[Path]:
    run_dir = _new_run_dir()
    yield run_dir
    _Registry(run_dir).terminate_all()  # anything a fixture failed to stop
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(services_run_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer.launch(services_run_dir)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbitmq(services_run_dir: Path) -> Iterator[RabbitMQ]:
    broker = RabbitMQ.launch(services_run_dir)
    yield broker
    broker.close()


@pytest.fixture
def clean_broker(rabbitmq: RabbitMQ) -> RabbitMQ:
    """The broker with an empty test vhost: no queue, exchange or connection left by an earlier test."""
    if not rabbitmq.pid_file.exists():  # an earlier fault test stopped it and failed before start()
        rabbitmq.start()
    rabbitmq.reset_vhost()
    return rabbitmq


@pytest.fixture
def tasker(clean_broker: RabbitMQ, redis_server: RedisServer) -> Iterator[Tasker]:
    """The test Tasker on an empty vhost and an empty Redis."""
    redis_server.flush()
    stand_in = Tasker(clean_broker, redis_server.client())
    yield stand_in
    stand_in.close()
