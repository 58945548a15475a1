"""Property tests of the input boundary: whatever a publisher on the broker sends, parsing and the option
policy either refuse it with Rejected or produce something whose every token is allow-listed, and the argv
built from it keeps the target last and free of file, target and script options.

The allow-list below is written out again on purpose, from contract §2.1 and the documented extras: it is
the specification the policy is checked against, not a copy of the policy's tables.
About 12,500 generated cases per run (see EXAMPLES); FALCORIA_FUZZ_SCALE scales them down where the search
itself is not the point (the package build's run against the packaged venv: the same pure code is searched in
full by the suite's unit tests)."""

from __future__ import annotations

import ipaddress
import os
import re
import string
import uuid
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from falcoria_worker.argv import phase1_argv, phase2_argv
from falcoria_worker.errors import Rejected
from falcoria_worker.model import ImportMode, Phase, parse_task
from falcoria_worker.policy import PolicyConfig, ScanOptions, check_options, time_ms

SCALE = float(os.environ.get("FALCORIA_FUZZ_SCALE", "1"))
FULL = {"text": 2500, "soup": 4000, "payload": 3000, "argv": 3000}
EXAMPLES = {kind: max(1, round(n * SCALE)) for kind, n in FULL.items()}


def fuzz(kind: str) -> settings:
    return settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SPEC_FLAGS = {
    "-n", "-R", "-sU", "-Pn", "-A", "-sC", "-O", "--traceroute", "-sV", "-sS", "-sT", "-6", "-F",
    "--defeat-rst-ratelimit", "--open", "--reason", "--version-light", "--version-all", "--osscan-guess",
    "--osscan-limit", "-T0", "-T1", "-T2", "-T3", "-T4", "-T5",
}  # fmt: skip
INT = {
    "--max-retries": (0, 50), "--min-rate": (1, 100_000), "--max-rate": (1, 100_000),
    "--version-intensity": (0, 9), "--min-parallelism": (1, 1024), "--max-parallelism": (1, 1024),
    "--max-os-tries": (1, 50),
}  # fmt: skip
TIME = {
    "--min-rtt-timeout": (1, 120_000), "--max-rtt-timeout": (1, 120_000),
    "--initial-rtt-timeout": (1, 120_000),
    "--host-timeout": (1000, 86_400_000), "--script-timeout": (1000, 86_400_000),
    "--scan-delay": (0, 60_000), "--max-scan-delay": (0, 60_000),
}  # fmt: skip
ALLOWED_SCRIPTS = frozenset({"http-title", "ssl-cert"})
CONFIG = PolicyConfig(allowed_scripts=ALLOWED_SCRIPTS, extra_flags=frozenset({"-v"}))
PORTS = re.compile(r"(?:(?:T:|U:)?[0-9]+(?:-[0-9]+)?)(?:,(?:T:|U:)?[0-9]+(?:-[0-9]+)?)*")

# ---- strategies ------------------------------------------------------------------------------------------

DANGEROUS = [
    "--script", "--script=vuln", "--script=http-title", "--script-args", "--script-args=a=b", "-script",
    "--scr", "-iL", "-iL/etc/shadow", "-iR", "-oN", "-oX", "-oA", "-oG", "-oN/tmp/x", "--append-output",
    "--resume", "--datadir", "--servicedb", "--versiondb", "--stylesheet", "--webxml", "--excludefile",
    "--exclude", "-D", "-S", "-e", "-g", "-b", "-sI", "--spoof-mac", "--proxies", "--data-length",
    "--privileged", "--unprivileged", "--", "-", "-p=1", "-T", "-sL", "-f", "--ttl",
]  # fmt: skip
VALUES = [
    "0", "1", "9", "20", "50", "51", "-1", "100ms", "2s", "1m", "1h", "25h", "1.5s", "0.5", "1e3",
    "http-title", "ssl-cert", "vuln", "http-title,ssl-cert", "http-title,vuln", "+http-title", "/tmp/x",
    "192.0.2.1", "2001:db8::1", "80", "1-65535", "-", "0-10", "T:80,U:53", "65536", "x", "", "$(id)", ";",
    "`id`",
]  # fmt: skip
option_names = st.sampled_from(
    sorted(SPEC_FLAGS | INT.keys() | TIME.keys() | {"-p", "--top-ports", "--script"})
)
token = st.one_of(
    option_names,
    st.sampled_from(DANGEROUS),
    st.sampled_from(VALUES),
    st.builds(lambda name, value: f"{name}={value}", option_names, st.sampled_from(VALUES)),
    st.builds(lambda value: f"-p{value}", st.sampled_from(VALUES)),
    st.text(alphabet=string.printable, max_size=12),
)
# Mostly well-formed options with values at and just past their limits, so that many cases are accepted and
# the "stays within spec" half of the properties is exercised, not only the refusals.
port_element = st.builds(
    lambda prefix, low, dash, high: f"{prefix}{low}{dash}{high}",
    st.sampled_from(["", "", "T:", "U:"]),
    st.sampled_from(["", "0", "1", "80", "65535", "65536"]),
    st.sampled_from(["", "-"]),
    st.sampled_from(["", "1", "443", "65535"]),
)
near_valid = st.one_of(
    st.sampled_from(sorted(SPEC_FLAGS)),
    st.sampled_from(sorted(INT)).flatmap(
        lambda name: st.integers(INT[name][0] - 1, INT[name][1] + 1).map(lambda value: f"{name} {value}")
    ),
    st.builds(
        lambda name, number, unit: f"{name} {number}{unit}",
        st.sampled_from(sorted(TIME)),
        st.integers(0, 130),
        st.sampled_from(["", "ms", "s", "m", "h"]),
    ),
    st.builds(lambda elements: "-p " + ",".join(elements), st.lists(port_element, min_size=1, max_size=5)),
    st.builds(lambda number: f"--top-ports={number}", st.integers(0, 70_000)),
    st.builds(
        lambda names: "--script " + ",".join(names), st.lists(st.sampled_from(VALUES[15:21]), min_size=1)
    ),
)
near_valid_soup = st.lists(near_valid, max_size=6).map(" ".join)
soup = st.one_of(st.lists(token, max_size=12).map(" ".join), near_valid_soup, near_valid_soup)
phases = st.sampled_from(list(Phase))


def _valid_ports(expression: str) -> bool:
    if not PORTS.fullmatch(expression):
        return False
    for element in expression.split(","):
        low, _, high = element.removeprefix("T:").removeprefix("U:").partition("-")
        if not 1 <= int(low) <= int(high or low) <= 65535:
            return False
    return True


def assert_within_spec(options: ScanOptions, phase: Phase, cfg: PolicyConfig) -> None:
    """Every token of an accepted option set is allow-listed, and every value valid."""
    tokens = list(options.tokens)
    while tokens:
        name = tokens.pop(0)
        if name in SPEC_FLAGS or name in cfg.extra_flags:
            continue
        value = tokens.pop(0)
        if name in INT:
            low, high = INT[name]
            assert value.isdigit() and low <= int(value) <= high, (name, value)
        elif name in TIME:
            low, high = TIME[name]
            millis = time_ms(value)
            assert millis is not None and low <= millis <= high, (name, value)
        else:
            assert name == "--script" and set(value.split(",")) <= cfg.allowed_scripts, (name, value)
    if phase is Phase.SERVICES:
        assert options.ports is None and options.top_ports is None and "-F" not in options.tokens
    if options.ports is not None:
        assert _valid_ports(options.ports), options.ports
    if options.top_ports is not None:
        assert 1 <= options.top_ports <= 65535


# ---- check_options ---------------------------------------------------------------------------------------


@fuzz("text")
@given(opts=st.text(max_size=200), phase=phases)
def test_check_options_on_any_text_refuses_or_stays_within_spec(opts: str, phase: Phase) -> None:
    try:
        options = check_options(opts, phase, CONFIG)
    except Rejected as exc:
        assert exc.field == "options"
        return
    assert_within_spec(options, phase, CONFIG)


@fuzz("soup")
@given(opts=soup, phase=phases, scripts=st.booleans())
def test_check_options_on_token_soup_refuses_or_stays_within_spec(
    opts: str, phase: Phase, scripts: bool
) -> None:
    cfg = CONFIG if scripts else PolicyConfig()
    try:
        options = check_options(opts, phase, cfg)
    except Rejected as exc:
        event("refused")
        # The refused token (or the character) is named, bounded in length.
        assert exc.reason.startswith(("option ", "options: ")), exc.reason
        assert len(exc.reason) < 400
        return
    event("accepted")
    assert_within_spec(options, phase, cfg)
    # Normalised output is a fixed point: checking it again gives the same options.
    again = " ".join(options.tokens)
    if options.ports is not None:
        again += f" -p {options.ports}"
    if options.top_ports is not None:
        again += f" --top-ports {options.top_ports}"
    assert check_options(again, phase, cfg) == options


# ---- parse_task ------------------------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "ip": "127.0.0.1",
    "hostnames": ["loopback.test"],
    "project": {"__type__": "uuid", "__value__": {"hex": "a2783030c0f74f4a9b3e1d2c3b4a5f60"}},
    "open_ports_opts": "-n --max-retries 1 -Pn -p 1,22,55432,56379,58000",
    "service_opts": "-sV -Pn",
    "timeout": 120,
    "include_services": True,
    "mode": "append",
    "user": {
        "id": {"__type__": "uuid", "__value__": {"hex": "8ce862741b2a4c5d8e9f0a1b2c3d4e5f"}},
        "username": "x",
    },
    "open_ports_str": "1 22 55432 56379 58000",
    "track_history": True,
}
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(
        ["127.0.0.1", "-127.0.0.1", "fe80::1%lo", "10.250.0.0/16", "2001:db8::1", "insert", "60"]
    ),
    st.uuids(),
    st.builds(
        lambda hex_text: {"__type__": "uuid", "__value__": {"hex": hex_text}}, st.text("0123456789abcdefz")
    ),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Per field: values Tasker could send (so that many payloads are accepted) mixed with anything at all.
local_ips = st.one_of(
    st.ip_addresses(network="127.0.0.0/8"),
    st.ip_addresses(network="10.250.0.0/16"),
    st.ip_addresses(network="2001:db8::/32"),  # documentation range: parsed, never scanned
)
uuid_forms = st.uuids().flatmap(
    lambda value: st.sampled_from(
        [value, str(value), value.hex, {"__type__": "uuid", "__value__": {"hex": value.hex}}]
    )
)
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "ip": local_ips.flatmap(lambda address: st.sampled_from([str(address), address.exploded])),
    "hostnames": st.lists(st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True), max_size=5),
    "project": uuid_forms,
    "open_ports_opts": st.text(max_size=60),
    "service_opts": st.text(max_size=60),
    # bool is an int subclass and 1.0 == 1: the type confusions a loose parser lets through
    "timeout": st.one_of(st.integers(-2, 90_000), st.booleans(), st.floats(0, 90_000), st.just("60")),
    "include_services": st.one_of(st.booleans(), st.integers(0, 1)),
    "mode": st.sampled_from([*ImportMode, "INSERT", "delete"]),
    "user": st.fixed_dictionaries({"id": uuid_forms, "username": st.text(max_size=20)}),
    "open_ports_str": st.text(max_size=60),
    "track_history": st.one_of(st.booleans(), st.integers(0, 1)),
}
payloads = st.one_of(
    json_like,
    st.builds(
        lambda changes, dropped: {
            **{key: value for key, value in BASE.items() if key not in dropped},
            **changes,
        },
        st.fixed_dictionaries(
            {}, optional={key: st.one_of(value, value, value, json_like) for key, value in FIELDS.items()}
        ),
        st.sets(st.sampled_from(sorted(BASE)), max_size=1),
    ),
)


@fuzz("payload")
@given(data=payloads)
def test_parse_task_refuses_or_returns_a_clean_task(data: object) -> None:
    try:
        task = parse_task(data)
    except Rejected as exc:
        event("refused")
        assert exc.field is not None
        assert exc.reason.startswith(f"{exc.field.split('[')[0]}") or exc.field == "task"
        return
    event("accepted")
    assert task.ip == ipaddress.ip_address(task.ip).compressed
    assert not task.ip.startswith("-")
    assert str(uuid.UUID(task.project)) == task.project
    assert isinstance(task.timeout, int) and not isinstance(task.timeout, bool)
    assert 1 <= task.timeout <= 86400
    assert isinstance(task.mode, ImportMode)
    assert type(task.include_services) is bool
    assert type(task.track_history) is bool


# ---- argv ------------------------------------------------------------------------------------------------

targets = local_ips.map(lambda address: address.compressed)
open_ports = st.lists(
    st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535)), min_size=1, max_size=50
)


@fuzz("argv")
@given(
    ip=targets,
    ports_opts=soup,
    service_opts=soup,
    found=open_ports,
    privileged=st.booleans(),
    scripts=st.booleans(),
)
def test_argv_keeps_target_last_and_output_fixed(
    *,
    ip: str,
    ports_opts: str,
    service_opts: str,
    found: list[tuple[str, int]],
    privileged: bool,
    scripts: bool,
) -> None:
    cfg = CONFIG if scripts else PolicyConfig()
    task = parse_task({**BASE, "ip": ip})
    built = []
    for phase, opts in ((Phase.PORTS, ports_opts), (Phase.SERVICES, service_opts)):
        try:
            options = check_options(opts, phase, cfg)
            common = {"nmap": "nmap", "privileged": privileged, "xml_path": "/w/out.xml"}
            if phase is Phase.PORTS:
                built.append(phase1_argv(task, options, **common))
            else:
                built.append(phase2_argv(task, options, found, **common))
        except Rejected:
            event(f"{phase} refused")
            continue
        event(f"{phase} accepted")
        assert_within_spec(options, phase, cfg)
    for argv in built:
        assert argv[-2:] == ["--", task.ip]
        assert argv[-6:-2] == ["-oX", "/w/out.xml", "--stats-every", "2s"]
        options_part = argv[1:-6]
        assert "--" not in options_part and task.ip not in options_part
        for index, item in enumerate(options_part):
            assert not item.startswith(("-o", "-i")), item
            assert len(item.encode()) < 128 * 1024
            if item.startswith("--script") and item != "--script-timeout":
                assert item == "--script" and set(options_part[index + 1].split(",")) <= cfg.allowed_scripts
        assert options_part.count("-6") == (1 if ":" in task.ip else 0)
        assert options_part.count("--privileged") == (1 if privileged else 0)
