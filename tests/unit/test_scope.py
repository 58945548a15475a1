"""scope.Scope: longest prefix wins, on a tie configured beats built-in and deny beats allow, the built-in
deny list is always there, a configured allow list replaces allow-all, and IPv4-mapped IPv6 is judged as
the IPv4 host."""

from __future__ import annotations

import pytest

from falcoria_worker.errors import ConfigError, Rejected
from falcoria_worker.scope import Scope


def refusal(scope: Scope, ip: str) -> str:
    with pytest.raises(Rejected) as caught:
        scope.check(ip)
    assert caught.value.field == "ip"
    return caught.value.reason


@pytest.mark.parametrize(
    ("ip", "network", "label"),
    [
        ("0.0.0.0", "0.0.0.0/8", "'this network'"),
        ("127.0.0.1", "127.0.0.0/8", "loopback"),
        ("127.255.255.254", "127.0.0.0/8", "loopback"),
        ("169.254.1.1", "169.254.0.0/16", "link-local"),
        ("224.0.0.1", "224.0.0.0/4", "multicast"),
        ("239.255.255.250", "224.0.0.0/4", "multicast"),
        ("240.0.0.1", "240.0.0.0/4", "reserved"),
        ("255.255.255.255", "255.255.255.255/32", "broadcast"),
        ("::", "::/128", "unspecified"),
        ("::1", "::1/128", "loopback"),
        ("fe80::1", "fe80::/10", "link-local"),
        ("ff02::1", "ff00::/8", "multicast"),
        ("::ffff:127.0.0.1", "127.0.0.0/8", "loopback"),
        ("::ffff:169.254.169.254", "169.254.0.0/16", "link-local"),
    ],
)
def test_builtin_deny_list(ip: str, network: str, label: str) -> None:
    reason = refusal(Scope.from_strings(), ip)
    assert reason == f"target {ip} refused: in denied network {network} ({label}, built-in)"


@pytest.mark.parametrize(
    "ip", ["192.0.2.1", "198.51.100.200", "203.0.113.9", "2001:db8::1", "::ffff:192.0.2.1"]
)
def test_default_allows_everything_else(ip: str) -> None:
    Scope.from_strings().check(ip)


def test_configured_allow_replaces_allow_all() -> None:
    scope = Scope.from_strings(allow=["10.250.0.0/16"])
    scope.check("10.250.1.2")
    assert "not in any allowed network (10.250.0.0/16)" in refusal(scope, "192.0.2.1")
    assert "not in any allowed network" in refusal(scope, "2001:db8::1")


def test_more_specific_allow_beats_builtin_deny() -> None:
    scope = Scope.from_strings(allow=["127.0.0.1/32"])
    scope.check("127.0.0.1")
    scope.check("::ffff:127.0.0.1")
    assert "in denied network 127.0.0.0/8 (loopback, built-in)" in refusal(scope, "127.0.0.2")


def test_configured_allow_beats_builtin_deny_of_the_same_network() -> None:
    scope = Scope.from_strings(allow=["127.0.0.0/8"])
    scope.check("127.0.0.1")
    scope.check("127.3.4.5")
    wider = Scope.from_strings(allow=["127.0.0.0/8", "169.0.0.0/8"])
    assert "169.254.0.0/16" in refusal(wider, "169.254.1.1")


def test_tie_between_configured_allow_and_deny_denies() -> None:
    scope = Scope.from_strings(allow=["192.0.2.0/24"], deny=["192.0.2.0/24"])
    assert "in denied network 192.0.2.0/24 (SCOPE_DENY)" in refusal(scope, "192.0.2.5")


def test_more_specific_deny_beats_allow_and_less_specific_deny_loses() -> None:
    scope = Scope.from_strings(
        allow=["192.0.2.0/24", "198.51.100.7/32"], deny=["192.0.2.128/25", "198.51.100.0/24"]
    )
    scope.check("192.0.2.1")
    assert "in denied network 192.0.2.128/25 (SCOPE_DENY)" in refusal(scope, "192.0.2.200")
    scope.check("198.51.100.7")
    assert "198.51.100.0/24" in refusal(scope, "198.51.100.8")


def test_configured_deny_on_top_of_allow_all() -> None:
    scope = Scope.from_strings(deny=["2001:db8::/32", "203.0.113.0/24"])
    assert "in denied network 2001:db8::/32 (SCOPE_DENY)" in refusal(scope, "2001:db8::5")
    assert "in denied network 203.0.113.0/24" in refusal(scope, "::ffff:203.0.113.1")
    scope.check("192.0.2.1")


def test_builtin_deny_cannot_be_configured_away() -> None:
    scope = Scope.from_strings(allow=["0.0.0.0/0", "::/0"], deny=[])
    assert len(scope.deny) == 10
    refusal(scope, "127.0.0.1")
    refusal(scope, "::1")


def test_from_strings_accepts_addresses_and_host_bits() -> None:
    scope = Scope.from_strings(allow=[" 192.0.2.9 ", "198.51.100.77/24"])
    assert [str(network) for network in scope.allow] == ["192.0.2.9/32", "198.51.100.0/24"]


@pytest.mark.parametrize(
    ("allow", "deny", "key"), [(["nope"], [], "SCOPE_ALLOW"), ([], ["10.0.0.0/33"], "SCOPE_DENY")]
)
def test_bad_networks_are_config_errors(allow: list[str], deny: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Scope.from_strings(allow=allow, deny=deny)
    assert caught.value.key == key


@pytest.mark.parametrize("ip", ["", "example.test", "192.0.2.0/24", "-1", "fe80::1%eth0", "2001:db8::1%1"])
def test_non_addresses_are_refused(ip: str) -> None:
    assert "not an IP address" in refusal(Scope.from_strings(), ip)
