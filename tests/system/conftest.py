"""Fixtures of the system layer: a booted Debian container (harness.py), the .deb, and Redis and
RabbitMQ on the host's bridge address where the container can reach them.

    suite             (session)  the Debian release, one of PACKAGE_SUITES (parametrises what uses it)
    system_container  (session)  harness.Container of that release, booted once per release; skipped
                                 without root or nspawn
    package_deb       (session)  the .deb for that release (deb_for)
    upgraded_deb      (session)  that .deb with a higher version: on Debian 12 the deep rebuild, on another
                                 release the plain build repacked with the higher version (repacked)
    deep_rebuild      (session)  a rebuild of the Debian 12 .deb with a higher version, built from a copy
                                 of the checkout at a path longer than 120 characters (deep_checkout)
    falcoria_deb      (session)  the .deb for Debian 12 (harness.SUITE), for tests that boot their own
    bridge_services   (session)  (RedisServer, RabbitMQ) bound to 127.0.0.1 and the bridge address

The package scenario runs on Debian 12 (bookworm) and Debian 13 (trixie), one release after the other;
the second costs about a minute with warm caches. FALCORIA_SYSTEST_DISTS (space or comma separated)
narrows it, e.g. FALCORIA_SYSTEST_DISTS=bookworm.

The times of the expensive steps (TIMINGS, seconds) and other measurements (FACTS, unit in the name) are
printed at the end of the run, those of releases other than bookworm in their own section.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import RabbitMQ, RedisServer, service_pair
from tests.system import harness

TIMINGS: dict[str, float] = {}
FACTS: dict[str, float] = {}
# (timings, facts) of each release; bookworm's are TIMINGS and FACTS themselves.
REPORTS: dict[str, tuple[dict[str, float], dict[str, float]]] = {harness.SUITE: (TIMINGS, FACTS)}

PACKAGE_SUITES = tuple(
    os.environ.get("FALCORIA_SYSTEST_DISTS", " ".join(harness.SUITES)).replace(",", " ").split()
)
_unknown = set(PACKAGE_SUITES) - set(harness.SUITES)
if _unknown or not PACKAGE_SUITES:
    raise pytest.UsageError(f"FALCORIA_SYSTEST_DISTS: choose from {', '.join(harness.SUITES)}")


def report(suite: str) -> tuple[dict[str, float], dict[str, float]]:
    """(timings, facts) where measurements of a test in `suite` belong."""
    return REPORTS.setdefault(suite, ({}, {}))


UPGRADE_SUFFIX = "upgradetest1"
# What scripts/build-deb printed on stderr (build and lintian) for each .deb it built.
BUILD_LOGS: dict[Path, str] = {}
DEEP = 120  # a venv built under a checkout this deep would be far over the kernel's 127-byte #! limit


@functools.cache
def deep_checkout() -> Path:
    """A copy of the checkout (without .git, .venv, caches, _build) at a path longer than DEEP characters,
    so that the package's independence of the checkout path is proven by a build that is needed anyway.
    Git reads the copy as this checkout's work tree, so its changelog names the same commit."""
    base = harness.REPO / "_build" / "deep-checkout"
    shutil.rmtree(base, ignore_errors=True)
    copy = base / ("d" * max(40, DEEP - len(str(base))))
    top = {"_build", ".venv", ".git", ".cache"}
    shutil.copytree(
        harness.REPO,
        copy,
        symlinks=True,
        ignore=lambda where, names: [
            n
            for n in names
            if n in {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
            or (Path(where) == harness.REPO and n in top)
        ],
    )
    return copy


def _git_env(checkout: Path) -> dict[str, str]:
    git_dir = subprocess.run(
        ["git", "-C", str(harness.REPO), "rev-parse", "--absolute-git-dir"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {"GIT_DIR": git_dir, "GIT_WORK_TREE": str(checkout)} if git_dir else {}


BUILDING_WAIT = 1200.0  # s: two builds side by side with the suite on a fresh 2-core machine


def _built_elsewhere(suite: str) -> Path:
    """The .deb scripts/test is building in the background: it writes <suite>.rc (exit status) last,
    after <suite>.deb (stdout, the path on its last line) and <suite>.log (stderr)."""
    building = Path(os.environ["FALCORIA_WORKER_DEBS"])
    rc = building / f"{suite}.rc"
    deadline = time.monotonic() + BUILDING_WAIT
    while not rc.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"no {suite} package from scripts/test after {BUILDING_WAIT:.0f} s ({building})")
        time.sleep(1)
    if rc.read_text().split()[0] != "0":
        log = (building / f"{suite}.log").read_text()
        pytest.fail(f"scripts/build-deb --dist {suite} failed:\n{log[-4000:]}")
    return Path((building / f"{suite}.deb").read_text().split()[-1])


@functools.cache
def deb_for(suite: str, version_suffix: str = "") -> Path:
    """The .deb for `suite`: $FALCORIA_WORKER_DEB (bookworm) or $FALCORIA_WORKER_DEB_TRIXIE; else the one
    scripts/test builds beside the suite ($FALCORIA_WORKER_DEBS); else built once here by scripts/build-deb
    --dist (a release other than the host's builds in its own cached build root). A rebuild with a
    version suffix is built from deep_checkout()."""
    variable = "FALCORIA_WORKER_DEB" if suite == harness.SUITE else f"FALCORIA_WORKER_DEB_{suite.upper()}"
    given = os.environ.get(variable)
    if given and not version_suffix:
        return Path(given)
    if os.environ.get("FALCORIA_WORKER_DEBS") and not version_suffix:
        return _built_elsewhere(suite)
    timings, facts = report(suite)
    started = time.monotonic()
    checkout, env, extra = harness.REPO, dict(os.environ), []
    if version_suffix:
        # A rebuild of the same tree skips debian/rules' unit-test run: the plain build ran it.
        env["DEB_BUILD_OPTIONS"] = "nocheck"
        checkout = deep_checkout()
        env.update(_git_env(checkout))
        extra = ["--version-suffix", version_suffix]
    proc = subprocess.run(
        [str(checkout / "scripts/build-deb"), "--dist", suite, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{checkout}/scripts/build-deb --dist {suite} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    deb = Path(proc.stdout.strip().splitlines()[-1])
    BUILD_LOGS[deb] = proc.stderr
    if version_suffix:
        timings["rebuild with a higher version"] = time.monotonic() - started
    else:
        timings["deb build + lintian"] = time.monotonic() - started
        facts["deb size (MB)"] = deb.stat().st_size / 1e6
    return deb


@pytest.fixture(scope="session", params=PACKAGE_SUITES)
def suite(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def system_container(suite: str) -> Iterator[harness.Container]:
    reason = harness.missing_prerequisite()
    if reason:
        pytest.skip(reason)
    # Per release: pytest finishes one release's container (and the lock) before it boots the next.
    with harness.session_lock(), harness.booted(timings=report(suite)[0], suite=suite) as container:
        yield container


@pytest.fixture(scope="session")
def package_deb(suite: str) -> Path:
    return deb_for(suite)


@pytest.fixture(scope="session")
def deep_rebuild() -> Path:
    """A rebuild of the same tree with a higher version (and __version__), from deep_checkout()."""
    return deb_for(harness.SUITE, UPGRADE_SUFFIX)


@pytest.fixture(scope="session")
def upgraded_deb(suite: str) -> Path:
    """The package of `suite` with a higher version (and __version__), for the upgrade test. The build
    path is the same on every release and the deep rebuild proves it once; another release's upgrade
    package is its plain build repacked, which spares a second build root run (3 to 4 minutes)."""
    if suite == harness.SUITE:
        return deb_for(suite, UPGRADE_SUFFIX)
    started = time.monotonic()
    deb = repacked(deb_for(suite), UPGRADE_SUFFIX)
    report(suite)[0]["repack with a higher version"] = time.monotonic() - started
    return deb


def repacked(deb: Path, suffix: str) -> Path:
    """`deb` with "+suffix" appended to its Debian version and to the packaged __version__ (md5sums
    kept true), as a rebuild with --version-suffix would have them."""
    work = deb.parent.parent / f"{deb.parent.name}-{suffix}"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    work.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    version = re.search(r"^Version: (.+)$", control.read_text(), re.M)
    assert version, control.read_text()
    control.write_text(control.read_text().replace(version.group(0), f"Version: {version[1]}+{suffix}"))
    [init] = tree.glob("opt/venvs/falcoria-worker/lib/python3*/site-packages/falcoria_worker/__init__.py")
    text = re.sub(r'^__version__ = "(.*)"$', rf'__version__ = "\1+{suffix}"', init.read_text(), flags=re.M)
    init.write_text(text)
    relative = str(init.relative_to(tree))
    digest = hashlib.md5(init.read_bytes(), usedforsecurity=False).hexdigest()
    md5sums = tree / "DEBIAN/md5sums"
    md5sums.write_text(
        re.sub(rf"^\w+  {re.escape(relative)}$", f"{digest}  {relative}", md5sums.read_text(), flags=re.M)
    )
    out = work / deb.name.replace(f"_{version[1]}_", f"_{version[1]}+{suffix}_")
    subprocess.run(["dpkg-deb", "-Zgzip", "--build", str(tree), str(out)], check=True, capture_output=True)
    shutil.rmtree(tree)
    return out


@pytest.fixture(scope="session")
def falcoria_deb() -> Path:
    return deb_for(harness.SUITE)


@pytest.fixture(scope="session")
def bridge_services(
    services_run_dir: Path, system_container: harness.Container
) -> Iterator[tuple[RedisServer, RabbitMQ]]:
    """Redis and RabbitMQ for the workers in the container; the bridge exists once the container is up."""
    with service_pair(services_run_dir, ("127.0.0.1", system_container.lab.host_ip)) as pair:
        yield pair


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for suite, (timings, facts) in REPORTS.items():
        if not (timings or facts):
            continue
        terminalreporter.section(f"system test timings ({suite})")
        for name, seconds in timings.items():
            terminalreporter.write_line(f"{name:45} {seconds:8.2f} s")
        for name, value in facts.items():
            terminalreporter.write_line(f"{name:45} {value:8.2f}")
