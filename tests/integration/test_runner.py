"""run_nmap and kill_orphan against real nmap and the network-namespace lab (root only).

Latencies are measured and printed (run with -s to see them), never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from falcoria_worker.errors import ScanFailed
from falcoria_worker.runner import (
    PID_RECORD,
    STDOUT_FILE,
    NmapProcess,
    NmapRun,
    kill_orphan,
    proc_starttime,
    run_nmap,
)
from tests.support.netns import NetnsLab

pytestmark = pytest.mark.integration

NMAP = shutil.which("nmap") or "nmap"
# Long enough that it is still running whenever a test stops it: every probe to the blackhole waits.
SLOW_SCAN = ["-sS", "-n", "-Pn", "-p", "1-65535", "--max-retries", "5"]


def port_states(xml_path: Path) -> Counter[str]:
    """State counts of every <port> in nmap's XML, streamed (a full-range scan is megabytes)."""
    states: Counter[str] = Counter()
    for _, elem in ET.iterparse(xml_path):  # noqa: S314 - our own nmap's output
        if elem.tag == "port":
            state = elem.find("state")
            states[state.get("state", "") if state is not None else ""] += 1
            elem.clear()
    return states


def live_group_members(pgid: int) -> list[int]:
    """PIDs of processes in group pgid that are not dead yet (a killed member that is not our child
    is a zombie until init reaps it; it runs nothing)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited while we looked
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def group_dies(pgid: int) -> bool:
    """SIGKILL is delivered asynchronously: wait (bounded) until no member of the group runs."""
    return wait_until(lambda: live_group_members(pgid) == [])


def gone_or_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_until(predicate: Callable[[], bool], limit: float = 10.0) -> bool:
    """Polls a condition that another process brings about; the limit only bounds a hang."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Started:
    """on_start callback that hands the NmapProcess to another thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.proc: NmapProcess | None = None

    def __call__(self, proc: NmapProcess) -> None:
        self.proc = proc
        self.event.set()

    def get(self) -> NmapProcess:
        assert self.event.wait(30), "nmap never started"
        assert self.proc is not None
        return self.proc


def test_full_range_of_an_allopen_host_completes(netns_lab: NetnsLab, tmp_path: Path) -> None:
    """The upstream deadlock case: megabytes of stdout while nobody reads a pipe."""
    xml = tmp_path / "scan.xml"
    run = run_nmap(
        [NMAP, "-sS", "-v", "-n", "-Pn", "-p", "1-65535", "-oX", str(xml), "--", netns_lab.allopen.ip],
        workdir=tmp_path,
        timeout=280,
    )
    stdout_size = (tmp_path / STDOUT_FILE).stat().st_size
    print(
        f"\n65,535-port scan: {run.duration:.2f} s, stdout {stdout_size / 1e6:.2f} MB, "
        f"XML {xml.stat().st_size / 1e6:.2f} MB"
    )
    assert (run.returncode, run.timed_out, run.cancelled) == (0, False, False), run.stderr_tail
    states = port_states(xml)
    # Every port reached the XML (the deadlock would cut it short). On a busy machine nmap may give up
    # on a few probes of 65,535 and call those ports filtered: that is nmap's verdict, not a loss.
    assert sum(states.values()) == 65535, states
    assert states["open"] >= 65535 - 20, states
    assert stdout_size > 1_000_000  # far beyond the 64 KiB that blocked the upstream worker
    assert not (tmp_path / PID_RECORD).exists()


def test_service_scan_identifies_the_listeners(netns_lab: NetnsLab, tmp_path: Path) -> None:
    target = netns_lab.services
    xml = tmp_path / "services.xml"
    ports = ",".join(str(p) for p in sorted(target.ports))
    run = run_nmap(
        [NMAP, "-sV", "-n", "-Pn", "-p", ports, "-oX", str(xml), "--", target.ip],
        workdir=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr_tail
    found = {}
    for port in ET.parse(xml).iter("port"):  # noqa: S314 - our own nmap's output
        service = port.find("service")
        assert port.find("state").get("state") == "open"  # type: ignore[union-attr]
        assert service is not None
        found[int(port.get("portid", "0"))] = (service.get("name"), service.get("product"))
    assert found == {21: ("ftp", "vsftpd"), 22: ("ssh", "OpenSSH"), 80: ("http", "SimpleHTTPServer")}


def test_timeout_kills_the_process_group(netns_lab: NetnsLab, tmp_path: Path) -> None:
    started = Started()
    run = run_nmap(
        [NMAP, *SLOW_SCAN, "-oX", str(tmp_path / "t.xml"), "--", netns_lab.blackhole.ip],
        workdir=tmp_path,
        timeout=1.0,
        on_start=started,
    )
    assert (run.returncode, run.timed_out, run.cancelled) == (None, True, False)
    assert group_dies(started.get().pid)
    assert not (tmp_path / PID_RECORD).exists()


def _cancel_after(started: Started, delay: float, stamps: list[float], event: threading.Event | None) -> None:
    proc = started.get()
    time.sleep(delay)  # let nmap get into its scan loop
    stamps.append(time.monotonic())
    if event is None:
        proc.cancel()
    else:
        event.set()


def _cancelled_run(lab: NetnsLab, workdir: Path, *, via_event: bool) -> tuple[NmapRun, float, int]:
    started, stamps = Started(), list[float]()
    event = threading.Event() if via_event else None
    canceller = threading.Thread(target=_cancel_after, args=(started, 0.2, stamps, event))
    canceller.start()
    run = run_nmap(
        [NMAP, *SLOW_SCAN, "-oX", str(workdir / "c.xml"), "--", lab.blackhole.ip],
        workdir=workdir,
        timeout=120,
        cancel=event,
        on_start=started,
    )
    returned = time.monotonic()
    canceller.join()
    return run, returned - stamps[0], started.get().pid


@pytest.mark.parametrize("via_event", [False, True], ids=["NmapProcess.cancel", "cancel-event"])
def test_cancel_from_another_thread_kills_the_group(
    netns_lab: NetnsLab, tmp_path: Path, via_event: bool
) -> None:
    latencies = []
    for i in range(20):
        run, latency, pid = _cancelled_run(netns_lab, tmp_path / str(i), via_event=via_event)
        assert (run.returncode, run.timed_out, run.cancelled) == (None, False, True)
        assert group_dies(pid)
        assert not (tmp_path / str(i) / PID_RECORD).exists()
        latencies.append(latency * 1000)
    how = "cancel Event" if via_event else "NmapProcess.cancel()"
    print(
        f"\n{how} -> run_nmap returned, 20 runs: p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms"
    )


def test_sigkill_after_grace_reaches_the_whole_group(tmp_path: Path) -> None:
    """nmap itself obeys SIGTERM; this group ignores it (leader and a background child) to exercise
    the SIGKILL after kill_grace and the kill of members that outlive their leader."""
    started = Started()
    threading.Thread(target=lambda: started.get().cancel()).start()
    run = run_nmap(
        ["/bin/sh", "-c", 'trap "" TERM; sleep 300 & wait'],
        workdir=tmp_path,
        timeout=60,
        on_start=started,
        kill_grace=0.3,
    )
    assert run.cancelled
    assert group_dies(started.get().pid)


def test_progress_reports_increasing_percentages(netns_lab: NetnsLab, tmp_path: Path) -> None:
    values: list[float] = []
    enough = threading.Event()

    def on_progress(value: float) -> None:
        values.append(value)
        if len(values) >= 4:
            enough.set()  # stop the slow scan once the point is made

    run = run_nmap(
        [
            NMAP,
            *SLOW_SCAN,
            "--stats-every",
            "250ms",
            "-oX",
            str(tmp_path / "p.xml"),
            "--",
            netns_lab.blackhole.ip,
        ],
        workdir=tmp_path,
        timeout=90,
        cancel=enough,
        on_progress=on_progress,
    )
    assert run.cancelled, f"scan ended before 4 progress reports: {values}"
    assert values == sorted(values)
    assert values[-1] > values[0]


def _spawn_crashing_worker(workdir: Path, target: str) -> int:
    """A worker process that dies (SIGKILL) while its nmap runs, leaving nmap and its record behind."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from falcoria_worker.runner import run_nmap\n"
        "run_nmap(sys.argv[2:], workdir=Path(sys.argv[1]), timeout=600,\n"
        "         on_start=lambda proc: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    argv = [NMAP, *SLOW_SCAN, "-oX", str(workdir / "orphan.xml"), "--", target]
    worker = subprocess.run([sys.executable, "-c", code, str(workdir), *argv], check=False)
    assert worker.returncode == -signal.SIGKILL
    return int(json.loads((workdir / PID_RECORD).read_text())["pid"])


def test_kill_orphan_stops_the_recorded_nmap(netns_lab: NetnsLab, tmp_path: Path) -> None:
    pid = _spawn_crashing_worker(tmp_path, netns_lab.blackhole.ip)
    assert not gone_or_zombie(pid)  # nmap outlived its worker
    assert kill_orphan(tmp_path / PID_RECORD)
    assert wait_until(lambda: gone_or_zombie(pid))
    assert not (tmp_path / PID_RECORD).exists()


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process in its own group, standing where a recycled PID would be."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("mismatch", ["starttime", "cmdline"])
def test_kill_orphan_spares_a_process_that_reused_the_pid(
    bystander: subprocess.Popen[bytes], tmp_path: Path, mismatch: str
) -> None:
    record = {
        "pid": bystander.pid,
        "starttime": proc_starttime(bystander.pid) + (1 if mismatch == "starttime" else 0),
        "argv0": "sleep" if mismatch == "starttime" else NMAP,
        # With the starttime mismatch the cmdline even matches: the start time alone must protect it.
        "xml": "300" if mismatch == "starttime" else str(tmp_path / "scan.xml"),
    }
    (tmp_path / PID_RECORD).write_text(json.dumps(record))
    assert not kill_orphan(tmp_path / PID_RECORD)
    assert bystander.poll() is None
    assert not (tmp_path / PID_RECORD).exists()


def test_kill_orphan_without_a_record(tmp_path: Path) -> None:
    assert not kill_orphan(tmp_path / PID_RECORD)


# --- unprivileged SYN scan: a `nobody` process with only CAP_NET_RAW -------------------------------

CHILD = """
import json, sys
from pathlib import Path
from falcoria_worker.caps import needs_privileged_flag, raw_sockets
from falcoria_worker.runner import run_nmap
run = run_nmap(sys.argv[2:], workdir=Path(sys.argv[1]), timeout=120)
print(json.dumps({"raw": raw_sockets(), "privileged": needs_privileged_flag(),
                  "returncode": run.returncode, "stderr": run.stderr_tail}))
"""

SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
WITH_NET_RAW = ["--inh-caps=+net_raw", "--ambient-caps=+net_raw", "--bounding-set=-all,+net_raw"]
WITHOUT_CAPS = ["--inh-caps=-all", "--bounding-set=-all"]


@pytest.fixture
def nobody_workdir() -> Iterator[Path]:
    """pytest's tmp_path is private to root; nmap running as nobody needs a directory it can write."""
    path = Path(tempfile.mkdtemp(prefix="fwrn-nobody-"))
    os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path)


def _as_nobody(caps: list[str], workdir: Path, target: str) -> tuple[dict[str, object], Path]:
    xml = workdir / "syn.xml"
    argv = [NMAP, "-sS", "--privileged", "-n", "-Pn", "-p", "21,22,80,81", "-oX", str(xml), "--", target]
    child = subprocess.run(
        [*SETPRIV, *caps, sys.executable, "-c", CHILD, str(workdir), *argv],
        cwd=workdir,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(child.stdout), xml


def test_syn_scan_as_nobody_with_cap_net_raw(netns_lab: NetnsLab, nobody_workdir: Path) -> None:
    result, xml = _as_nobody(WITH_NET_RAW, nobody_workdir, netns_lab.services.ip)
    assert (result["raw"], result["privileged"], result["returncode"]) == ("cap_net_raw", True, 0), result
    doc = ET.parse(xml)  # noqa: S314 - our own nmap's output
    assert doc.find("scaninfo").get("type") == "syn"  # type: ignore[union-attr]
    states = {int(p.get("portid", "0")): p.find("state").get("state") for p in doc.iter("port")}  # type: ignore[union-attr]
    assert states == {21: "open", 22: "open", 80: "open", 81: "closed"}


def test_without_the_capability_nobody_has_no_raw_sockets(netns_lab: NetnsLab, nobody_workdir: Path) -> None:
    result, _ = _as_nobody(WITHOUT_CAPS, nobody_workdir, netns_lab.services.ip)
    assert (result["raw"], result["privileged"]) == ("none", False)
    assert result["returncode"] != 0
    assert "QUITTING!" in str(result["stderr"]), result  # nmap's reason reaches stderr_tail


def test_a_failing_callback_still_kills_and_reaps_nmap(netns_lab: NetnsLab, tmp_path: Path) -> None:
    pids: list[int] = []

    def on_start(proc: NmapProcess) -> None:
        pids.append(proc.pid)
        raise RuntimeError("caller broke")

    with pytest.raises(RuntimeError, match="caller broke"):
        run_nmap(
            [NMAP, *SLOW_SCAN, "-oX", str(tmp_path / "f.xml"), "--", netns_lab.blackhole.ip],
            workdir=tmp_path,
            timeout=120,
            on_start=on_start,
        )
    assert group_dies(pids[0])
    assert not (tmp_path / PID_RECORD).exists()


def test_nmap_that_cannot_start_is_a_scan_failure(tmp_path: Path) -> None:
    with pytest.raises(ScanFailed, match="cannot start /nonexistent/nmap"):
        run_nmap(["/nonexistent/nmap", "-sT", "127.0.0.1"], workdir=tmp_path, timeout=5)


def test_nmap_gets_no_inherited_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's environment may hold RABBITMQ_PASSWORD and the ScanLedger token."""
    monkeypatch.setenv("WORKER_BACKEND_TOKEN", "s3cret")
    run = run_nmap(["env"], workdir=tmp_path, timeout=10)
    assert run.returncode == 0
    names = {line.split("=", 1)[0] for line in (tmp_path / STDOUT_FILE).read_text().splitlines()}
    assert names == {"PATH", "LANG"}
