"""parse_progress on lines captured from nmap 7.93 --stats-every, and the incremental stdout tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from falcoria_worker.runner import MAX_LINE, _StdoutTail, parse_progress


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("SYN Stealth Scan Timing: About 37.50% done; ETC: 03:06 (0:00:14 remaining)", 37.5),
        ("SYN Stealth Scan Timing: About 0.01% done", 0.01),  # early lines carry no ETC yet
        ("SYN Stealth Scan Timing: About 100.00% done; ETC: 03:06 (0:00:00 remaining)", 100.0),
        ("Connect Scan Timing: About 12.34% done; ETC: 03:07 (0:00:30 remaining)", 12.34),
        ("UDP Scan Timing: About 4.10% done; ETC: 03:30 (0:22:01 remaining)", 4.1),
        ("Service scan Timing: About 66.67% done; ETC: 03:06 (0:00:02 remaining)", 66.67),
        ("NSE Timing: About 93.75% done; ETC: 03:06 (0:00:00 remaining)", 93.75),
        (
            "Parallel DNS resolution of 1 host. Timing: About 50.00% done; ETC: 03:06 (0:00:01 remaining)",
            50.0,
        ),
        ("SYN Stealth Scan Timing: About 37.50% done; ETC: 03:06 (0:00:14 remaining)\r", 37.5),
    ],
)
def test_progress_lines(line: str, expected: float) -> None:
    assert parse_progress(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "Stats: 0:00:01 elapsed; 0 hosts completed (1 up), 1 undergoing SYN Stealth Scan",
        "Starting Nmap 7.93 ( https://nmap.org ) at 2026-11-28 03:06 UTC",
        "22/tcp open  ssh     OpenSSH 8.9p1 Ubuntu 3ubuntu0.6 (Ubuntu Linux; protocol 2.0)",
        "",
        # A target's banner ends up in stdout; it must not be able to fake progress.
        'SF:r(NULL,1D,"X Timing: About 99.00% done\\r\\n");',
        "|_banner: Scan Timing: About 99.00% done",
        "21/tcp open  ftp  Fake Timing: About 99.00% done",
        "SYN Stealth Scan Timing: About 250.00% done",
        # Host discovery before the port scan (a target on the local segment), not the phase's progress.
        "ARP Ping Scan Timing: About 100.00% done; ETC: 22:18 (0:00:00 remaining)",
        "Ping Scan Timing: About 50.00% done; ETC: 22:18 (0:00:01 remaining)",
    ],
)
def test_other_lines(line: str) -> None:
    assert parse_progress(line) is None


def test_tail_yields_only_new_complete_lines(tmp_path: Path) -> None:
    out = tmp_path / "nmap.stdout"
    out.write_bytes(b"")
    tail = _StdoutTail(out)
    with out.open("ab", buffering=0) as nmap:
        assert tail.new_lines() == []
        nmap.write(b"one\ntw")
        assert tail.new_lines() == [b"one"]
        nmap.write(b"o\nthree\n")
        assert tail.new_lines() == [b"two", b"three"]
        assert tail.new_lines() == []
    tail.close()


def test_tail_drops_an_endless_line(tmp_path: Path) -> None:
    out = tmp_path / "nmap.stdout"
    out.write_bytes(b"x" * (MAX_LINE + 1))
    tail = _StdoutTail(out)
    assert tail.new_lines() == []
    with out.open("ab") as nmap:
        nmap.write(b"tail end\nnext\n")
    # The first 64 KiB were dropped (bounded memory); the rest of that line arrives as a short line.
    assert tail.new_lines() == [b"tail end", b"next"]
    tail.close()
