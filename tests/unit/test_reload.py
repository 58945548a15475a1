"""SIGHUP reloads: which settings change for new tasks, which wait for a restart, and a refused reload."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from falcoria_worker import config
from falcoria_worker.errors import ConfigError
from falcoria_worker.reload import RESTART_KEYS, Reloader, held_back
from falcoria_worker.settings_io import LoadedSettings

BASE = {"HOSTNAME": "scanner1"}


def parsed(**values: str) -> config.Settings:
    return config.parse({**BASE, **values})


def loaded(**values: str) -> LoadedSettings:
    return LoadedSettings(parsed(**values), {}, ())


def test_restart_only_settings_keep_their_running_values_and_are_named() -> None:
    current = parsed(REDIS_PASS="old-secret", SCOPE_DENY="10.250.0.0/24")
    new, kept = held_back(
        current, parsed(REDIS_PASS="new-secret", SCOPE_DENY="10.250.1.0/24", CONCURRENCY="3")
    )
    assert kept == ["CONCURRENCY", "REDIS_PASS"]
    assert (new.redis_pass, new.concurrency) == ("old-secret", current.concurrency)
    assert new.scope_deny == ("10.250.1.0/24",)


def test_scanledger_can_change_but_not_appear_or_vanish() -> None:
    with_ledger = parsed(BACKEND_BASE_URL="http://127.0.0.1:9/", WORKER_BACKEND_TOKEN="t")
    assert (
        held_back(with_ledger, parsed(BACKEND_BASE_URL="http://127.0.0.2:9/", WORKER_BACKEND_TOKEN="t"))[1]
        == []
    )
    new, kept = held_back(with_ledger, parsed(WORKER_BACKEND_TOKEN="t"))
    assert kept == ["BACKEND_BASE_URL"]
    assert new.backend_base_url == with_ledger.backend_base_url


def test_every_connection_and_identity_setting_needs_a_restart() -> None:
    for key in (
        "RABBITMQ_HOST",
        "REDIS_PORT",
        "WORKER_BACKEND_TOKEN",
        "INSTANCE",
        "HOSTNAME",
        "STATE_DIR",
        "SOURCE_ADDRESS",
    ):
        assert key in RESTART_KEYS
    for key in ("SCOPE_ALLOW", "NMAP_EXTRA_FLAGS", "NMAP_ALLOWED_SCRIPTS", "SCANLEDGER_TIMEOUT", "WORKER_IP"):
        assert key not in RESTART_KEYS


def _reloader(load, engines: list) -> Reloader:
    def build(settings: config.Settings) -> object:
        engines.append(settings)
        return SimpleNamespace(settings=settings)

    return Reloader(load, build)  # type: ignore[arg-type]


def test_nothing_happens_without_a_signal() -> None:
    engines: list = []
    assert _reloader(loaded, engines).take(parsed()) is None
    assert engines == []


def test_a_refused_reload_keeps_the_old_settings_until_one_succeeds(caplog: pytest.LogCaptureFixture) -> None:
    answers = [
        ConfigError("SCOPE_DENY", "'x' is not a network", "list CIDRs"),
        loaded(SCOPE_DENY="10.250.9.0/24"),
    ]

    def load() -> LoadedSettings:
        answer = answers.pop(0)
        if isinstance(answer, ConfigError):
            raise answer
        return answer

    engines: list = []
    reloader = _reloader(load, engines)
    reloader.request()
    with caplog.at_level(logging.INFO):
        assert reloader.take(parsed()) is None
    assert reloader.problem is not None and reloader.problem.startswith("reload refused: SCOPE_DENY")
    assert "previous one stays in force" in caplog.text
    reloader.request()
    reloaded = reloader.take(parsed())
    assert reloaded is not None and reloaded.settings.scope_deny == ("10.250.9.0/24",)
    assert reloader.problem is None
    assert reloader.take(reloaded.settings) is None  # one reload per signal


def test_poll_hands_the_new_settings_to_every_part_that_reads_them() -> None:
    old = parsed()
    parts = [SimpleNamespace(settings=old, engine="old") for _ in range(5)]
    worker = SimpleNamespace(settings=old, engine=None)
    worker.admission, worker.scans, worker.control, worker.leases, worker.requeues = parts
    reloader = _reloader(lambda: loaded(SCOPE_ALLOW="127.0.0.0/8"), [])
    reloader.poll(worker)
    assert worker.settings is old  # no signal yet
    reloader.request()
    reloader.poll(worker)
    assert all(p.settings.scope_allow == ("127.0.0.0/8",) for p in [worker, *parts])
    assert all(p.engine.settings is worker.settings for p in parts)
