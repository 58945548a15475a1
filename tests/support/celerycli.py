"""Celery's own tools against the test broker: a stock worker started by the test and `celery inspect`.

stock_worker(broker, node)   context manager: `celery worker --pool threads` of tests.support.stock_app,
                             named `node`, consuming Tasker's scan queue; yields the node name once it
                             answers ping
inspect(broker, cmd, node)   what `celery -b URL inspect <cmd> --json -d node` prints, parsed: {node: reply}
control(broker, cmd, node)   the same for `celery control <cmd>`
keys_missing(theirs, ours)   dotted paths of keys the stock reply has and ours lacks (dicts recursively,
                             lists compared through their first element)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.services import RabbitMQ

REPO = Path(__file__).resolve().parents[2]
CELERY = [sys.executable, "-m", "celery"]


def _env(broker: RabbitMQ) -> dict[str, str]:
    env = dict(os.environ)
    env["FW_STOCK_BROKER_URL"] = broker.url()
    env["PYTHONPATH"] = str(REPO)
    return env


def _run(broker: RabbitMQ, words: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CELERY, "-b", broker.url(), *words],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(broker),
        cwd=REPO,
        check=False,
    )


def _replies(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    # `--json` prints one JSON object mapping node name to reply; "No nodes replied" goes to stderr.
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {}


def inspect(broker: RabbitMQ, command: str, node: str, *args: str, timeout: float = 5.0) -> dict[str, Any]:
    proc = _run(
        broker, ["inspect", command, *args, "--json", "-d", node, "--timeout", str(timeout)], timeout + 30
    )
    return _replies(proc)


@contextlib.contextmanager
def stock_worker(broker: RabbitMQ, node: str, log: Path) -> Iterator[str]:
    """A stock Celery worker of the tiny app, stopped (QUIT, then KILL) when the block ends."""
    argv = [
        *CELERY,
        "-A",
        "tests.support.stock_app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        "2",
        "--hostname",
        node,
        "--loglevel",
        "INFO",
        "--without-gossip",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(broker), cwd=REPO)
    try:
        for _ in range(30):
            if proc.poll() is not None:
                raise RuntimeError(f"stock worker exited: {log.read_text()[-2000:]}")
            if inspect(broker, "ping", node, timeout=1.0).get(node):
                break
        else:
            raise RuntimeError(f"stock worker never answered ping: {log.read_text()[-2000:]}")
        yield node
    finally:
        proc.send_signal(signal.SIGQUIT)  # a cold stop: a warm one would wait for the running task
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def keys_missing(theirs: object, ours: object, path: str = "") -> list[str]:
    if isinstance(theirs, dict):
        if not isinstance(ours, dict):
            return [path or "."]
        missing = []
        for key, value in theirs.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in ours:
                missing.append(where)
            else:
                missing += keys_missing(value, ours[key], where)
        return missing
    if isinstance(theirs, list | tuple):
        if not isinstance(ours, list | tuple) or len(ours) < len(theirs):
            return [f"{path}[]"]
        missing = []
        for index, (their_item, our_item) in enumerate(zip(theirs, ours, strict=False)):
            missing += keys_missing(their_item, our_item, f"{path}[{index}]")
        return missing
    return []
