"""The nmap option allow-list. Option strings come from the queue, so they are refused unless every token is
an option Tasker can produce (contract §2.1) or a listed harmless extra, with a valid value.

nmap parses its command line with getopt_long_only, which also accepts single-dash long options and
unambiguous abbreviations (`-script`, `--scr`). The allow-list therefore matches exact spellings only;
the dangerous-option table below exists to give a specific reason, never to decide what is allowed.

Ports: nmap scans port 0 only when it is named explicitly. Tasker never sends it (1..65535) and nothing
useful listens there, so port 0 is refused and `-p-` means 1-65535, as in nmap.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from falcoria_worker.errors import ConfigError, Rejected
from falcoria_worker.model import MAX_OPTS_LEN, Phase

MAX_PORT = 65535

# Value-less flags: Tasker's (-n -R -sU -Pn -A -sC -O --traceroute -sV) and harmless extras.
_FLAGS = frozenset(
    {
        "-n", "-R", "-sU", "-Pn", "-A", "-sC", "-O", "--traceroute", "-sV",
        "-sS", "-sT", "-6", "-F", "--defeat-rst-ratelimit",
        "--open", "--reason", "--version-light", "--version-all", "--osscan-guess", "--osscan-limit",
    }
)  # fmt: skip
_TIMING_LEVELS = ("0", "1", "2", "3", "4", "5")
_TIMING = frozenset(f"-T{level}" for level in _TIMING_LEVELS)
_NEEDS_RAW = frozenset({"-sS", "-sU", "-O", "--traceroute", "-A", "--defeat-rst-ratelimit"})
_PHASE1_ONLY = frozenset({"-p", "--top-ports", "-F"})

_NUMBER = re.compile(r"[0-9]{1,6}")
# nmap time spec: a number, optionally fractional, optionally ms/s/m/h (default seconds).
_TIME = re.compile(r"([0-9]{1,6})(?:\.([0-9]{1,3}))?(ms|s|m|h)?")
_TIME_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, None: 1000}
_SCRIPT_NAME = re.compile(r"[a-z0-9_-]{1,64}")
_EXTRA_FLAG = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9-]{0,40}")
_PORT = re.compile(r"[0-9]{1,5}")
# NSE categories and the 'all' pseudo-name select many scripts at once; an operator names scripts one by one.
_NSE_CATEGORIES = frozenset(
    {
        "all", "auth", "broadcast", "brute", "default", "discovery", "dos", "exploit", "external",
        "fuzzer", "intrusive", "malware", "safe", "version", "vuln",
    }
)  # fmt: skip

_RUNS_CODE = "runs NSE code (allow scripts with NMAP_ALLOWED_SCRIPTS)"
_NSE_CONTROL = "controls NSE scripts; refused even when scripts are allowed"
_READS_FILES = "reads local files"
_WRITES_FILES = "writes local files (the worker chooses nmap's output)"
_TARGETS = "changes the target list (a task has exactly one target)"
_SPOOFS = "spoofs the scanner's identity or crafts packets"
_PRIVILEGE = "the worker decides privileges"
# Long names (without dashes, getopt_long_only accepts one or two) of options refused for a specific reason.
_DANGEROUS_LONG = {
    "script": _RUNS_CODE,
    "script-args": _NSE_CONTROL,
    "script-trace": _NSE_CONTROL,
    "script-updatedb": _NSE_CONTROL,
    "script-help": _NSE_CONTROL,
    "script-args-file": _READS_FILES,
    "iL": _READS_FILES,
    "excludefile": _READS_FILES,
    "resume": _READS_FILES,
    "datadir": _READS_FILES,
    "servicedb": _READS_FILES,
    "versiondb": _READS_FILES,
    "append-output": _WRITES_FILES,
    "stylesheet": _WRITES_FILES,
    "webxml": _WRITES_FILES,
    "no-stylesheet": _WRITES_FILES,
    "log-errors": _WRITES_FILES,
    "iR": _TARGETS,
    "exclude": _TARGETS,
    "sL": _TARGETS,
    "source-port": _SPOOFS,
    "spoof-mac": _SPOOFS,
    "proxies": _SPOOFS,
    "proxy": _SPOOFS,
    "ttl": _SPOOFS,
    "data": _SPOOFS,
    "data-string": _SPOOFS,
    "data-length": _SPOOFS,
    "ip-options": _SPOOFS,
    "badsum": _SPOOFS,
    "mtu": _SPOOFS,
    "scanflags": _SPOOFS,
    "send-eth": _PRIVILEGE,
    "send-ip": _PRIVILEGE,
    "privileged": _PRIVILEGE,
    "unprivileged": _PRIVILEGE,
}
# Single-dash short options whose value may be attached (-oN/x, -D1.2.3.4); nothing allowed starts so.
_DANGEROUS_SHORT = (
    ("-sI", _SPOOFS),
    ("-o", _WRITES_FILES),
    ("-iL", _READS_FILES),
    ("-iR", _TARGETS),
    ("-i", _READS_FILES),
    ("-S", _SPOOFS),
    ("-D", _SPOOFS),
    ("-e", _SPOOFS),
    ("-g", _SPOOFS),
    ("-b", _SPOOFS),
    ("-f", _SPOOFS),
)
# Long options of nmap 7.93 that take a value: an operator's value-less extra flag must not be (or abbreviate)
# one of them, or nmap would swallow the next token as its value.
_NMAP_VALUE_LONG = frozenset(
    {
        "datadir", "servicedb", "versiondb", "max-os-tries", "max-parallelism", "min-parallelism",
        "max-rtt-timeout", "min-rtt-timeout", "initial-rtt-timeout", "excludefile", "exclude",
        "max-hostgroup", "min-hostgroup", "scanflags", "host-timeout", "scan-delay", "max-scan-delay",
        "max-retries", "source-port", "nsock-engine", "proxies", "proxy", "data", "data-string",
        "data-length", "stylesheet", "spoof-mac", "version-intensity", "dns-servers", "port-ratio",
        "exclude-ports", "top-ports", "script", "script-args", "script-args-file", "script-help",
        "script-timeout", "ip-options", "min-rate", "max-rate", "stats-every", "route-dst", "ttl", "mtu",
        "resume", "iL", "iR", "sI",
    }
)  # fmt: skip
# Short options of nmap 7.93 that require a value ("b:D:e:g:i:M:m:o:p:S:T:" in its optstring).
_NMAP_VALUE_SHORT = frozenset("bDegiMmopST")


@dataclass(frozen=True)
class PolicyConfig:
    allowed_scripts: frozenset[str] = frozenset()  # NSE script names an operator allows for --script
    extra_flags: frozenset[str] = frozenset()  # extra value-less flags an operator allows

    def __post_init__(self) -> None:
        for name in self.allowed_scripts:
            problem = _script_name_problem(name)
            if problem:
                raise ConfigError("NMAP_ALLOWED_SCRIPTS", f"{name!r} {problem}", "list NSE script names only")
        for flag in self.extra_flags:
            problem = _extra_flag_problem(flag)
            if problem:
                raise ConfigError("NMAP_EXTRA_FLAGS", f"{flag!r} {problem}", "list harmless value-less flags")


@dataclass(frozen=True)
class ScanOptions:
    tokens: tuple[str, ...]  # normalised argv tokens, WITHOUT -p/--top-ports, target or output options
    ports: str | None  # phase 1's -p expression, normalised ("1-65535" for "-p-")
    top_ports: int | None
    udp: bool  # -sU present
    tcp_scan: str | None  # "-sS" / "-sT" / None (nmap default)
    needs_raw: bool  # -sS, -sU, -O, --traceroute, -A (-O inside), --defeat-rst-ratelimit
    ipv6: bool  # -6 given


_DEFAULT_CONFIG = PolicyConfig()


def _script_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not _SCRIPT_NAME.fullmatch(name):
        return "is not a script name ([a-z0-9_-] only: no paths, globs or '+')"
    if name in _NSE_CATEGORIES:
        return "is an NSE category, not a script"
    return None


def _extra_flag_problem(flag: object) -> str | None:
    if not isinstance(flag, str) or not _EXTRA_FLAG.fullmatch(flag):
        return "is not an option spelling"
    reason = _danger(flag)
    if reason:
        return f"is refused: {reason}"
    if len(flag) == 2:  # getopt_long_only reads "-x" as the short option x
        return "takes a value" if flag[1] in _NMAP_VALUE_SHORT else None
    bare = flag.lstrip("-")
    if any(name.startswith(bare) for name in _NMAP_VALUE_LONG):
        return "takes a value"
    return None


def _danger(token: str) -> str | None:
    """A specific reason for a known-dangerous option, in any spelling getopt_long_only would accept."""
    bare = token.lstrip("-").split("=", 1)[0]
    if bare in _DANGEROUS_LONG:
        return _DANGEROUS_LONG[bare]
    if bare.startswith("script-") and bare != "script-timeout":
        return _NSE_CONTROL
    if len(bare) >= 3:
        # An abbreviation: name the reason of the shortest option it abbreviates (--scr -> --script).
        abbreviated = sorted((name for name in _DANGEROUS_LONG if name.startswith(bare)), key=len)
        if abbreviated:
            return _DANGEROUS_LONG[abbreviated[0]]
    if not token.startswith("--"):
        for prefix, reason in _DANGEROUS_SHORT:
            if token.startswith(prefix):
                return reason
    return None


def _show(token: str) -> str:
    return repr(token if len(token) <= 64 else token[:64] + "...")


def _refuse(token: str, reason: str) -> Rejected:
    return Rejected(f"option {_show(token)} refused: {reason}", field="options")


# ---- values ----------------------------------------------------------------------------------------------


def _int_value(low: int, high: int) -> Callable[[str, str], str]:
    def check(option: str, value: str) -> str:
        if not _NUMBER.fullmatch(value) or not low <= int(value) <= high:
            raise _refuse(f"{option} {value}", f"value must be an integer {low}..{high}")
        return str(int(value))

    return check


def time_ms(value: str) -> float | None:
    """nmap time spec ("500ms", "2s", "1.5m", "1h", "30" = seconds) -> milliseconds, or None if invalid."""
    match = _TIME.fullmatch(value)
    if not match:
        return None
    whole, fraction, unit = match.groups()
    return float(f"{whole}.{fraction or 0}") * _TIME_UNIT_MS[unit]


def _time_value(low_ms: int, high_ms: int, shown: str) -> Callable[[str, str], str]:
    def check(option: str, value: str) -> str:
        millis = time_ms(value)
        if millis is None or not low_ms <= millis <= high_ms:
            raise _refuse(f"{option} {value}", f"value must be a time {shown} (e.g. 500ms, 2s, 1m, 1h)")
        return value

    return check


def _ports_value(option: str, value: str) -> str:
    return normalise_ports(value)


_VALUE_OPTIONS: dict[str, Callable[[str, str], str]] = {
    "-p": _ports_value,
    "--top-ports": _int_value(1, MAX_PORT),
    "--max-retries": _int_value(0, 50),
    "--min-rtt-timeout": _time_value(1, 120_000, "1ms..120s"),
    "--max-rtt-timeout": _time_value(1, 120_000, "1ms..120s"),
    "--initial-rtt-timeout": _time_value(1, 120_000, "1ms..120s"),
    "--min-rate": _int_value(1, 100_000),
    "--max-rate": _int_value(1, 100_000),
    "--version-intensity": _int_value(0, 9),
    "--host-timeout": _time_value(1000, 86_400_000, "1s..24h"),
    "--script-timeout": _time_value(1000, 86_400_000, "1s..24h"),
    "--scan-delay": _time_value(0, 60_000, "0..60s"),
    "--max-scan-delay": _time_value(0, 60_000, "0..60s"),
    "--min-parallelism": _int_value(1, 1024),
    "--max-parallelism": _int_value(1, 1024),
    "--max-os-tries": _int_value(1, 50),
    "--script": lambda option, value: value,  # checked against the config in _check_scripts
}
# A minimum above its maximum: nmap quits for rates and parallelism and silently bends rtt timeouts;
# refused here with a clear reason.
_MIN_MAX: tuple[tuple[str, str, Callable[[str], float | None]], ...] = (
    ("--min-rate", "--max-rate", float),
    ("--min-rtt-timeout", "--max-rtt-timeout", time_ms),
    ("--min-parallelism", "--max-parallelism", float),
)


# ---- ports -----------------------------------------------------------------------------------------------


def format_port_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """Sorted, merged, comma-joined ranges: [(5, 5), (1, 3), (4, 4)] -> "1-5"."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in merged)


def _port_range(element: str, expression: str) -> tuple[int, int]:
    first, dash, last = element.partition("-")
    if not all(_PORT.fullmatch(part) for part in (first, last) if part) or not (first or dash):
        raise _refuse(f"-p {expression}", f"bad port element {_show(element)} (use N, A-B, A-, -B or -)")
    if not dash:
        low = high = int(first)
    else:
        # nmap: an omitted start is 1, an omitted end is 65535.
        low = int(first) if first else 1
        high = int(last) if last else MAX_PORT
    if not 1 <= low <= high <= MAX_PORT:
        raise _refuse(f"-p {expression}", f"port range {_show(element)} outside 1..{MAX_PORT} or reversed")
    return low, high


def normalise_ports(expression: str) -> str:
    """Validate an nmap -p expression (N, A-B, A-, -B, -, comma lists, T:/U: prefixes) and return it
    sorted and merged per protocol group: "80,T:22-25,U:53". Service names, '[...]' and S: are refused."""
    groups: dict[str, list[tuple[int, int]]] = {"": [], "T:": [], "U:": []}
    current = ""
    if not expression:
        raise _refuse("-p", "empty port list")
    for raw in expression.split(","):
        element = raw
        if element[:2] in ("T:", "U:"):
            current, element = element[:2], element[2:]
        groups[current].append(_port_range(element, expression))
    return ",".join(prefix + format_port_ranges(ranges) for prefix, ranges in groups.items() if ranges)


# ---- tokens ----------------------------------------------------------------------------------------------


def _tokens(opts: str) -> list[str]:
    if len(opts) > MAX_OPTS_LEN:
        raise Rejected(f"options: too long ({len(opts)} characters, at most {MAX_OPTS_LEN})", field="options")
    for index, char in enumerate(opts):
        if not " " <= char <= "~":
            raise Rejected(
                f"options: non-ASCII or non-printable character U+{ord(char):04X} at position {index}",
                field="options",
            )
    return opts.split()


def _split(tokens: list[str]) -> list[tuple[str, str | None, str]]:
    """-> (option, value or None, token as written) for every option; refuses anything not allow-listed."""
    parsed: list[tuple[str, str | None, str]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        name, attached = _attached(token)
        if name in _VALUE_OPTIONS:
            if attached is None:
                if index == len(tokens):
                    raise _refuse(token, "needs a value")
                attached = tokens[index]
                index += 1
            parsed.append((name, attached, token))
        elif name == "-T":
            if attached is None and index < len(tokens):
                attached = tokens[index]
                index += 1
            if attached not in _TIMING_LEVELS:
                raise _refuse(token, "timing template must be -T0..-T5")
            parsed.append((f"-T{attached}", None, token))
        else:
            parsed.append((token, None, token))
    return parsed


def _attached(token: str) -> tuple[str, str | None]:
    """Split off an attached value: "--opt=value", "-p80", "-p-", "-T4" -> (option, value)."""
    if token.startswith("--") and "=" in token:
        name, value = token.split("=", 1)
        return name, value
    # getopt_long_only reads "-privileged" as --privileged, not as -p "rivileged": a lower-case letter after
    # -p or -T starts a long option, refused (with its own reason) as a whole token.
    if token[:2] in ("-p", "-T") and len(token) > 2 and not token[2].islower():
        return token[:2], token[2:]
    return token, None


def _flag_reason(token: str, cfg: PolicyConfig) -> str | None:
    if token in _FLAGS or token in _TIMING or token in cfg.extra_flags:
        return None
    if not token.startswith("-") or token in ("-", "--"):
        return "not an option (an extra target or a stray value?)"
    if "-" + token in _FLAGS or "-" + token in _VALUE_OPTIONS.keys() - {"--script"}:
        return f"not in the allow-list (write it as -{token})"
    return _danger(token) or "not in the allow-list"


def _check_scripts(value: str, token: str, cfg: PolicyConfig) -> None:
    for name in value.split(","):
        if name not in cfg.allowed_scripts:
            raise _refuse(token, f"{_RUNS_CODE}; {_show(name)} is not an allowed script")


def check_options(opts: str, phase: Phase, cfg: PolicyConfig = _DEFAULT_CONFIG) -> ScanOptions:
    """Validate an option string from a task against the allow-list -> normalised ScanOptions."""
    if not isinstance(opts, str):
        raise Rejected(f"options: expected a string, got {type(opts).__name__}", field="options")
    seen: dict[str, str | None] = {}
    tokens: list[str] = []
    for name, raw_value, token in _split(_tokens(opts)):
        if raw_value is None:
            reason = _flag_reason(name, cfg)
            if reason:
                raise _refuse(token, reason)
        if phase is Phase.SERVICES and name in _PHASE1_ONLY:
            raise _refuse(token, "not allowed in phase 2 (its ports come from phase 1)")
        if name in seen or (name.startswith("-T") and any(key.startswith("-T") for key in seen)):
            raise _refuse(token, "given more than once")
        value = None if raw_value is None else _VALUE_OPTIONS[name](name, raw_value)
        if name == "--script" and value is not None:
            _check_scripts(value, token, cfg)
        seen[name] = value
        if name not in ("-p", "--top-ports"):
            tokens += [name] if value is None else [name, value]
    _check_combinations(seen)
    top_ports = seen.get("--top-ports")
    return ScanOptions(
        tokens=tuple(tokens),
        ports=seen.get("-p"),
        top_ports=int(top_ports) if top_ports is not None else None,
        udp="-sU" in seen,
        tcp_scan="-sS" if "-sS" in seen else "-sT" if "-sT" in seen else None,
        needs_raw=any(name in _NEEDS_RAW for name in seen),
        ipv6="-6" in seen,
    )


def _check_combinations(seen: dict[str, str | None]) -> None:
    if "-sS" in seen and "-sT" in seen:
        raise _refuse("-sT", "only one TCP scan type (-sS or -sT)")
    if "-F" in seen and "-p" in seen:
        raise _refuse("-F", "cannot be combined with -p (nmap refuses it)")
    for low, high, magnitude in _MIN_MAX:
        low_value, high_value = seen.get(low), seen.get(high)
        if low_value is None or high_value is None:
            continue
        # Both values were validated already, so magnitude() is never None here.
        if (magnitude(low_value) or 0) > (magnitude(high_value) or 0):
            raise _refuse(f"{low} {low_value}", f"greater than {high} {high_value}")
