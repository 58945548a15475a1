"""The monitoring tools an operator points at a fleet, run by the tests on loopback and private ports.

  Flower.start(broker, log)        Flower (from PyPI, in the test venv) against the test broker, its API
                                   open without auth on 127.0.0.1 only; .get(path) -> parsed JSON or text,
                                   .wait_for(path, predicate) polls until it holds; .stop()
  NodeExporter.start(dir, log)     Debian's prometheus-node-exporter with only the textfile collector on
                                   `dir`; .metrics() -> the exposition text; .stop()
  screenshot(url, png, profile)    headless Chromium (Debian's package) renders `url` to `png`; Flower
                                   fills its tables after the page loads, hence the virtual time budget

Each tool is stopped by the test that started it (TERM, then KILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.services import RabbitMQ, _free_ports, _wait_tcp

LOOPBACK = "127.0.0.1"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _fetch(url: str, timeout: float = 10.0) -> str:
    # Loopback only: the URL is always one of ours.
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
        return response.read().decode()


@dataclass
class Flower:
    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, broker: RabbitMQ, log: Path) -> Flower:
        port = _free_ports(1)
        env = dict(os.environ, FLOWER_UNAUTHENTICATED_API="true")
        argv = [sys.executable, "-m", "celery", "-b", broker.url(), "flower",
                f"--address={LOOPBACK}", f"--port={port}"]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        flower = cls(proc, port)
        try:
            _wait_tcp(LOOPBACK, port, 60)
        except OSError:
            _stop(proc)
            raise RuntimeError(f"Flower did not start: {log.read_text()[-2000:]}") from None
        return flower

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def get(self, path: str) -> Any:
        text = _fetch(self.url + path)
        return json.loads(text) if text.lstrip().startswith(("{", "[")) else text

    def wait_for(self, path: str, predicate: Callable[[Any], bool], timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = self.get(path)
            if predicate(got):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"Flower's {path} never matched: {str(got)[:2000]}")
            time.sleep(0.5)

    def stop(self) -> None:
        _stop(self.proc)


@dataclass
class NodeExporter:
    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, textfile_dir: Path, log: Path) -> NodeExporter:
        port = _free_ports(1)
        argv = ["/usr/bin/prometheus-node-exporter", f"--web.listen-address={LOOPBACK}:{port}",
                "--collector.disable-defaults", "--collector.textfile",
                f"--collector.textfile.directory={textfile_dir}"]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        exporter = cls(proc, port)
        try:
            _wait_tcp(LOOPBACK, port, 30)
        except OSError:
            _stop(proc)
            raise RuntimeError(f"node_exporter did not start: {log.read_text()[-2000:]}") from None
        return exporter

    def metrics(self) -> str:
        return _fetch(f"http://{LOOPBACK}:{self.port}/metrics")

    def stop(self) -> None:
        _stop(self.proc)


def screenshot(url: str, png: Path, profile: Path, *, budget_ms: int = 5000) -> None:
    """Renders `url` as the operator's browser would, with nothing fetched but the page itself."""
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            "--window-size=1400,900", f"--screenshot={png}", url]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=120)


@contextlib.contextmanager
def running(tool: Flower | NodeExporter) -> Iterator[Any]:
    try:
        yield tool
    finally:
        tool.stop()
