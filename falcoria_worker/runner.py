"""Runs one nmap process: its own process group, output to files, timeout, cancel, progress.

Why it looks like this (contract §7): the upstream worker gave nmap stdout/stderr pipes that nobody read,
so nmap blocked in write() once its output passed 64 KiB; and its cancel sent SIGTERM to a PID read back
from Redis, which after a crash can belong to an unrelated process. Here output goes to files (nmap never
blocks on us, whatever it prints), the whole process group is signalled, and only while its leader is our
unreaped child: a zombie keeps its PID (and so the group id) reserved, so the number cannot be reused
before we reap it ourselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ScanFailed

# How often the wait loop checks the cancel Event, the deadline and the stdout file. Exit of nmap
# and NmapProcess.cancel() do not wait for it: the first wakes the loop via a pidfd, the second
# signals from the caller's thread.
POLL_INTERVAL = 0.1
STDERR_TAIL_BYTES = 2048
# A stdout "line" longer than this is not a progress line; dropping it bounds memory.
MAX_LINE = 64 * 1024
PID_RECORD = "nmap.pid"
STDOUT_FILE = "nmap.stdout"
STDERR_FILE = "nmap.stderr"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# "<phase> Timing: About 37.50% done; ETC: ...". Anchored, with no ":" or "|" before " Timing", so a
# banner that a target echoes into stdout (SF: fingerprint lines, NSE "|" output) cannot fake progress.
# Host discovery ("ARP Ping Scan", which resolves the MAC of a target on the local segment even with
# -Pn) reports its own 100% before the port scan starts at 0: it is not the phase's progress.
_PROGRESS = re.compile(
    r"^(?!.*Ping Scan Timing)[A-Za-z][A-Za-z0-9 .-]* Timing: About (\d{1,3}(?:\.\d+)?)% done"
)


@dataclass(frozen=True)
class NmapRun:
    returncode: int | None  # None when the runner stopped nmap (timed_out or cancelled)
    timed_out: bool
    cancelled: bool
    duration: float  # seconds from start to reaping
    stderr_tail: str  # last ~2 KiB of nmap's stderr, for error reasons


def parse_progress(line: str) -> float | None:
    """Percentage of an nmap --stats-every line ("... Timing: About 37.50% done; ETC: ...") or None."""
    match = _PROGRESS.search(line)
    if match is None:
        return None
    value = float(match.group(1))
    return value if value <= 100.0 else None


class NmapProcess:
    """Handle of a running nmap, given to on_start; safe to use from any thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # Held while signalling and while reaping, so a signal never races the reap.
        self._lock = threading.Lock()
        self._reaped = False
        self._cancel_requested = False
        self._term_sent_at: float | None = None

    def cancel(self) -> None:
        """SIGTERM the process group now (from the caller's thread); the runner SIGKILLs after kill_grace."""
        self._cancel_requested = True
        self._signal_group(signal.SIGTERM)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def _signal_group(self, sig: signal.Signals) -> None:
        with self._lock:
            if self._reaped:
                return
            if sig == signal.SIGTERM and self._term_sent_at is None:
                self._term_sent_at = time.monotonic()
            # The leader is unreaped, so the group id is still ours; ESRCH cannot happen while the
            # zombie leader is a member, EPERM only for a member that changed its uid.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def _terminate_sent_at(self) -> float | None:
        with self._lock:
            return self._term_sent_at

    def _reap(self, popen: subprocess.Popen[bytes]) -> int:
        with self._lock:
            # Leftover group members (nmap itself forks none, but a helper might) die with the leader.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            returncode = popen.wait()
            self._reaped = True
            return returncode


def _leader_exited(pid: int) -> bool:
    """True once the leader is a zombie; WNOWAIT leaves it unreaped so its PID stays reserved."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def proc_starttime(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: start time in clock ticks since boot (identifies a process)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    # comm (field 2) may contain spaces and ")"; the fields after its last ")" start at field 3.
    return int(stat[stat.rindex(")") + 2 :].split()[22 - 3])


def _xml_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == "-oX":
            return argv[i + 1]
    return None


def _write_record(path: Path, pid: int, argv: Sequence[str]) -> None:
    record = {"pid": pid, "starttime": proc_starttime(pid), "argv0": argv[0], "xml": _xml_path(argv)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(path)


def kill_orphan(record_path: Path) -> bool:
    """SIGKILL the group of an nmap left behind by a crashed worker; True if it was signalled.

    It is signalled only if /proc still shows the recorded process (same start time, and the
    recorded -oX path in its command line), so a process that reused the PID is left alone.
    The record is removed either way: after this call it describes nothing that runs.
    """
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        pid, starttime, xml = int(record["pid"]), int(record["starttime"]), record["xml"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        same = isinstance(xml, str) and proc_starttime(pid) == starttime and os.fsencode(xml) in cmdline
        if same:
            # A window of microseconds remains between this check and the signal; a process
            # that is not our child cannot be pinned like an unreaped one.
            os.killpg(pid, signal.SIGKILL)
    except (OSError, ValueError):
        same = False
    record_path.unlink(missing_ok=True)
    return same


class _StdoutTail:
    """Reads only the bytes nmap appended since the last call and yields complete lines."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self._partial = b""

    def new_lines(self) -> list[bytes]:
        chunk = self._file.read()
        if not chunk:
            return []
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
        return lines

    def close(self) -> None:
        self._file.close()


def _stderr_tail(path: Path) -> str:
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _environment() -> dict[str, str]:
    # Only what nmap needs: the worker's environment may hold broker and ScanLedger credentials.
    return {"PATH": os.environ.get("PATH") or DEFAULT_PATH, "LANG": "C"}


def run_nmap(
    argv: Sequence[str],
    *,
    workdir: Path,
    timeout: float,
    cancel: threading.Event | None = None,
    on_start: Callable[[NmapProcess], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    kill_grace: float = 2.0,
) -> NmapRun:
    """Run nmap to the end, the timeout or a cancel; never blocks on nmap's output.

    Raises ScanFailed when nmap cannot be started. If a callback raises, nmap's group is killed
    and reaped before the exception propagates.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = workdir / STDOUT_FILE, workdir / STDERR_FILE
    record_path = workdir / PID_RECORD
    started = time.monotonic()
    try:
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_environment(),
                cwd=workdir,
                close_fds=True,
                start_new_session=True,
            )
    except OSError as exc:
        raise ScanFailed(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc

    proc = NmapProcess(popen.pid)
    stopped_by: str | None = None
    try:
        with contextlib.ExitStack() as stack:
            pidfd = os.pidfd_open(popen.pid)
            stack.callback(os.close, pidfd)
            tail = stack.enter_context(contextlib.closing(_StdoutTail(stdout_path)))
            _write_record(record_path, popen.pid, argv)
            if on_start is not None:
                on_start(proc)
            stopped_by = _supervise(
                proc,
                pidfd,
                tail,
                started + timeout,
                cancel=cancel,
                on_progress=on_progress,
                kill_grace=kill_grace,
            )
    finally:
        # Any way out (nmap's exit, or a callback or a syscall that raised) leaves no nmap behind:
        # _reap SIGKILLs the group before it waits.
        returncode = proc._reap(popen)
        record_path.unlink(missing_ok=True)
    if proc.cancel_requested and stopped_by is None:
        stopped_by = "cancel"  # cancel() raced nmap's own exit: the caller asked to stop, honour it
    return NmapRun(
        returncode=None if stopped_by else returncode,
        timed_out=stopped_by == "timeout",
        cancelled=stopped_by == "cancel",
        duration=time.monotonic() - started,
        stderr_tail=_stderr_tail(stderr_path),
    )


def _supervise(
    proc: NmapProcess,
    pidfd: int,
    tail: _StdoutTail,
    deadline: float,
    *,
    cancel: threading.Event | None,
    on_progress: Callable[[float], None] | None,
    kill_grace: float,
) -> str | None:
    """Waits until the leader exits (left unreaped); returns "cancel", "timeout" or None (ran to its end)."""
    stopped_by: str | None = None
    killed = False
    while not _leader_exited(proc.pid):
        if on_progress is not None:
            _report_progress(tail, on_progress)
        now = time.monotonic()
        if stopped_by is None:
            if proc.cancel_requested or (cancel is not None and cancel.is_set()):
                stopped_by = "cancel"
            elif now >= deadline:
                stopped_by = "timeout"
            if stopped_by is not None:
                proc._signal_group(signal.SIGTERM)
        term_at = proc._terminate_sent_at()
        if not killed and term_at is not None and now >= term_at + kill_grace:
            proc._signal_group(signal.SIGKILL)
            killed = True
        # Wakes at once when nmap exits (the pidfd becomes readable), else after one poll.
        select.select([pidfd], [], [], POLL_INTERVAL)
    if on_progress is not None:
        _report_progress(tail, on_progress)
    return stopped_by


def _report_progress(tail: _StdoutTail, on_progress: Callable[[float], None]) -> None:
    for line in tail.new_lines():
        if b"% done" in line:  # cheap filter: a 65,535-port scan prints megabytes of other lines
            value = parse_progress(line.decode("ascii", errors="replace"))
            if value is not None:
                on_progress(value)
