"""policy.check_options: everything Tasker can produce is accepted and normalised, everything else refused
with a reason that names the token (the hostile corpus), and the operator's config cannot open the
dangerous options."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from falcoria_worker.errors import ConfigError, Rejected
from falcoria_worker.model import Phase
from falcoria_worker.policy import PolicyConfig, ScanOptions, check_options, normalise_ports, time_ms
from tests.corpus import cases

ALL_FLAGS_SERVICE_OPTS = (
    "--max-retries 3 --min-rtt-timeout 100ms --max-rtt-timeout 3000ms --initial-rtt-timeout 500ms "
    "--min-rate 50 --max-rate 300 -A -sC -O -sV -Pn"
)


def test_captured_phase1_options() -> None:
    assert check_options("-n --max-retries 1 -Pn -p 1,22,55432,56379,58000", Phase.PORTS) == ScanOptions(
        tokens=("-n", "--max-retries", "1", "-Pn"),
        ports="1,22,55432,56379,58000",
        top_ports=None,
        udp=False,
        tcp_scan=None,
        needs_raw=False,
        ipv6=False,
    )


def test_all_flags_service_options() -> None:
    options = check_options(ALL_FLAGS_SERVICE_OPTS, Phase.SERVICES)
    assert options.tokens == tuple(ALL_FLAGS_SERVICE_OPTS.split())
    assert options.ports is None
    assert options.needs_raw  # -A and -O
    assert not options.udp


def _common_variants() -> list[list[str]]:
    """Every combination of Tasker's common fields, at the edges of Tasker's ranges (contract §2.1)."""
    variants = []
    for dns, retries, min_rtt, max_rtt, initial_rtt, min_rate, max_rate in itertools.product(
        (["-R"], ["-n"]),
        ([], ["--max-retries", "0"], ["--max-retries", "20"]),
        ([], ["--min-rtt-timeout", "1ms"]),
        ([], ["--max-rtt-timeout", "60000ms"]),
        ([], ["--initial-rtt-timeout", "500ms"]),
        ([], ["--min-rate", "1"]),
        ([], ["--max-rate", "30000"]),
    ):
        variants.append(dns + retries + min_rtt + max_rtt + initial_rtt + min_rate + max_rate)
    return variants


def test_every_tasker_phase1_combination_is_accepted() -> None:
    count = 0
    for common in _common_variants():
        for udp, skip_discovery, ports in itertools.product(
            ([], ["-sU"]), ([], ["-Pn"]), ("1-65535", "80,443,8080,1000-2000", "1")
        ):
            tokens = [*common, *udp, *skip_discovery, "-p", ports]
            options = check_options(" ".join(tokens), Phase.PORTS)
            assert options.tokens == tuple(tokens[:-2])
            assert options.udp is bool(udp)
            assert options.needs_raw is bool(udp)
            count += 1
    assert count == 2 * 3 * 2**5 * 12


def test_every_tasker_phase2_combination_is_accepted() -> None:
    count = 0
    for common in _common_variants():
        for aggressive, scripts, os_detection, traceroute, udp in itertools.product(
            *[([], [flag]) for flag in ("-A", "-sC", "-O", "--traceroute", "-sU")]
        ):
            tokens = [*common, *aggressive, *scripts, *os_detection, *traceroute, "-sV", *udp, "-Pn"]
            options = check_options(" ".join(tokens), Phase.SERVICES)
            assert options.tokens == tuple(tokens)
            assert options.needs_raw is bool(aggressive or os_detection or traceroute or udp)
            count += 1
    assert count == 2 * 3 * 2**5 * 32


@pytest.mark.parametrize(
    ("given", "tokens", "ports"),
    [
        ("--max-retries=2 -p80", ("--max-retries", "2"), "80"),
        ("-p-", (), "1-65535"),
        ("-p -", (), "1-65535"),
        ("-T 4 --min-rate=0100", ("-T4", "--min-rate", "100"), None),
        ("-T4", ("-T4",), None),
        ("   -n     -Pn  ", ("-n", "-Pn"), None),
        ("--host-timeout=1.5h --scan-delay 0", ("--host-timeout", "1.5h", "--scan-delay", "0"), None),
    ],
)
def test_attached_values_are_split_off_and_normalised(
    given: str, tokens: tuple[str, ...], ports: str | None
) -> None:
    options = check_options(given, Phase.PORTS)
    assert options.tokens == tokens
    assert options.ports == ports


def test_short_option_value_takes_no_equals_sign() -> None:
    # nmap would read "-p=80" as the port expression "=80".
    with pytest.raises(Rejected, match="bad port element"):
        check_options("-p=80", Phase.PORTS)


@pytest.mark.parametrize(
    ("expression", "normalised"),
    [
        ("80", "80"),
        ("443,80,80,81,82", "80-82,443"),
        ("1-100,50-200", "1-200"),
        ("-1024", "1-1024"),
        ("60000-", "60000-65535"),
        ("-", "1-65535"),
        ("65535", "65535"),
        ("T:80,443,U:53,161", "T:80,443,U:53,161"),
        ("22,T:80,U:53", "22,T:80,U:53"),
        ("U:53,T:80", "T:80,U:53"),
        ("T:-", "T:1-65535"),
        (",".join(str(port) for port in range(1, 1001)), "1-1000"),
    ],
)
def test_port_expressions(expression: str, normalised: str) -> None:
    assert normalise_ports(expression) == normalised
    assert check_options(f"-p {expression}", Phase.PORTS).ports == normalised


@pytest.mark.parametrize(
    ("given", "expected"),
    [("500ms", 500), ("2s", 2000), ("1m", 60_000), ("1h", 3_600_000), ("30", 30_000), ("1.5s", 1500)],
)
def test_time_specs(given: str, expected: float) -> None:
    assert time_ms(given) == expected


@pytest.mark.parametrize("given", ["", "1d", "-1s", "1.s", ".5s", "1e3", "1 s", "1S", "1234567s"])
def test_bad_time_specs(given: str) -> None:
    assert time_ms(given) is None


def test_safe_extras_are_accepted() -> None:
    extras = (
        "-sS -T5 --top-ports 100 --version-intensity 9 --host-timeout 30m --script-timeout 2m "
        "--defeat-rst-ratelimit -6 --open --reason --version-light --osscan-guess --osscan-limit "
        "--max-scan-delay 10ms --scan-delay 1s --min-parallelism 1 --max-parallelism 64 --max-os-tries 2"
    )
    options = check_options(extras, Phase.PORTS)
    assert options.top_ports == 100
    assert "--top-ports" not in options.tokens
    assert options.tcp_scan == "-sS"
    assert options.needs_raw
    assert options.ipv6
    assert check_options("-F --version-all -sT", Phase.PORTS).tcp_scan == "-sT"


@pytest.mark.parametrize(
    ("given", "needs_raw"),
    [
        *[(flag, True) for flag in ("-sS", "-sU", "-O", "--traceroute", "-A", "--defeat-rst-ratelimit")],
        *[(flags, False) for flags in ("-sT", "-sV -sC -Pn -n", "")],
    ],
)
def test_needs_raw(given: str, needs_raw: bool) -> None:
    assert check_options(given, Phase.PORTS).needs_raw is needs_raw


def test_allowed_scripts_pass_only_by_name() -> None:
    cfg = PolicyConfig(allowed_scripts=frozenset({"http-title", "ssl-cert"}))
    options = check_options("-sV --script=http-title,ssl-cert", Phase.SERVICES, cfg)
    assert options.tokens == ("-sV", "--script", "http-title,ssl-cert")
    with pytest.raises(Rejected, match="'vuln' is not an allowed script"):
        check_options("--script http-title,vuln", Phase.SERVICES, cfg)


def test_extra_flags_are_allowed_only_when_configured() -> None:
    with pytest.raises(Rejected, match="'-v' refused: not in the allow-list"):
        check_options("-v", Phase.PORTS)
    cfg = PolicyConfig(extra_flags=frozenset({"-v", "--disable-arp-ping"}))
    assert check_options("-v --disable-arp-ping", Phase.PORTS, cfg).tokens == ("-v", "--disable-arp-ping")


def test_extra_flags_cannot_reopen_phase_limits() -> None:
    cfg = PolicyConfig(extra_flags=frozenset({"-F"}))
    with pytest.raises(Rejected, match="not allowed in phase 2"):
        check_options("-F", Phase.SERVICES, cfg)


@pytest.mark.parametrize(
    "flag",
    [
        "--script", "--script-trace", "-script", "--scr", "-oN", "-oX", "-iL", "-iR", "--datadir", "--datad",
        "--resume", "--append-output", "--privileged", "--unprivileged", "-D", "-S", "-e", "-g", "-b", "-sI",
        "--spoof-mac", "--proxies", "--data-length", "--badsum", "--excludefile",
        # take a value: nmap would swallow the next token
        "-p", "-T", "-M", "--max-retries", "--top-ports", "--exclude-ports", "--dns-servers", "--stats-every",
        # not an option spelling
        "v", "-v -d", "--opt=1", "", "-\u00e9",
    ],
)  # fmt: skip
def test_config_refuses_dangerous_or_value_taking_extra_flags(flag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PolicyConfig(extra_flags=frozenset({flag}))
    assert caught.value.key == "NMAP_EXTRA_FLAGS"


@pytest.mark.parametrize(
    "name",
    ["default", "all", "vuln", "safe", "http-*", "+http-title", "../x", "/tmp/x.nse", "x.nse", "HTTP", ""],
)
def test_config_refuses_script_categories_paths_and_globs(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PolicyConfig(allowed_scripts=frozenset({name}))
    assert caught.value.key == "NMAP_ALLOWED_SCRIPTS"


def test_phase2_refuses_port_selection() -> None:
    for given in ("-p 80", "-p80", "--top-ports 10", "--top-ports=10", "-F"):
        with pytest.raises(Rejected, match="phase 2"):
            check_options(given, Phase.SERVICES)


def test_non_string_options_are_refused() -> None:
    with pytest.raises(Rejected, match="expected a string"):
        check_options(["-n"], Phase.PORTS)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", cases("hostile_options.json"), ids=lambda case: case["name"])
def test_hostile_options_are_rejected_with_their_reason(case: dict[str, Any]) -> None:
    cfg = PolicyConfig(allowed_scripts=frozenset(case.get("allowed_scripts", ())))
    with pytest.raises(Rejected) as caught:
        check_options(case["input"], Phase(case.get("phase", Phase.PORTS)), cfg)
    assert case["reason"] in caught.value.reason
    assert caught.value.field == "options"


def test_refusal_names_the_token_but_bounds_its_length() -> None:
    token = "--" + "x" * 1000
    with pytest.raises(Rejected) as caught:
        check_options(token, Phase.PORTS)
    assert token[:60] in caught.value.reason
    assert len(caught.value.reason) < 200
