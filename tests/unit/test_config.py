"""config.py: typed parsing of every key, the refusal messages, and the derived connection values."""

from __future__ import annotations

import dataclasses
import re
import ssl
from pathlib import Path

import pytest
from kombu import Connection

from falcoria_worker import config
from falcoria_worker.errors import ConfigError

BASE = {"HOSTNAME": "scanner1"}


def parsed(**values: str) -> config.Settings:
    return config.parse({**BASE, **values})


def refusal(**values: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parsed(**values)
    return info.value


def test_table_and_dataclass_hold_the_same_keys_in_the_same_order() -> None:
    names = [
        f.name.upper()
        for f in dataclasses.fields(config.Settings)
        if f.name not in ("unknown_keys", "machine_hostname")
    ]
    assert names == list(config.KNOWN_KEYS)
    assert set(config.DEFAULTS) == set(config.KNOWN_KEYS)
    assert config.SECRET_KEYS.issubset(config.KNOWN_KEYS)


def test_defaults_follow_the_design_table() -> None:
    s = parsed()
    assert (s.rabbitmq_host, s.rabbitmq_port, s.rabbitmq_user, s.rabbitmq_password, s.rabbitmq_vhost) == (
        "localhost",
        5672,
        "guest",
        "",
        "/",
    )
    assert (s.redis_host, s.redis_port, s.redis_db, s.redis_pass) == ("localhost", 6379, 3, "")
    assert s.backend_base_url is None
    assert s.worker_backend_token == ""
    assert s.instance == "1"
    assert s.node_name == "worker1"
    assert s.state_dir == Path("/var/lib/falcoria-worker/1")
    assert s.concurrency == 1
    assert s.logger_level == "INFO"
    assert s.exchange_name == "nmap_exchange"
    assert s.exchange_type == "topic"
    assert s.nmap_scan_queue_name == "nmap_scan_queue"
    assert s.nmap_scan_routing_key == "nmap.scan"
    assert s.nmap_cancel_queue_name == "nmap_cancel_queue"
    assert s.worker_service_broadcast_queue == "worker_service_broadcast"
    assert s.nmap_open_ports_opts == "-n -Pn --top-ports 1000"
    assert s.nmap_service_opts == "-sV -Pn"
    assert s.nmap_allowed_scripts == s.nmap_extra_flags == s.scope_allow == s.scope_deny == ()
    assert s.scanledger_ca_bundle is None
    assert s.scanledger_timeout == 60
    assert s.upload_backoff_max == 300
    assert s.worker_ip is None
    assert s.ip_echo_url is None
    assert (s.status_ttl, s.lease_ttl, s.max_attempts, s.kill_grace) == (604800, 60, 3, 2)
    assert s.stats_every == "2s"
    assert s.require_task_metadata is True
    assert s.unknown_keys == ()


def test_upstream_env_names_are_accepted() -> None:
    # The keys of an upstream .env (contract §6), already upper-cased by settings_io.
    upstream = {
        "RABBITMQ_HOST": "myserver",
        "RABBITMQ_USER": "falcoria",
        "RABBITMQ_PASSWORD": "pw",
        "RABBITMQ_VHOST": "falcoria_vhost",
        "REDIS_PASS": "rp",
        "BACKEND_BASE_URL": "http://scanledger:443/",
        "WORKER_BACKEND_TOKEN": "tok",
        "CELERY_APP_NAME": "nmap_celery_consumer",
        "QUEUE": "nmap_queue",
        "ROUTING_KEY": "nmap.#",
        "NMAP_CANCEL_ROUTING_KEY": "nmap.cancel",
        "NMAP_CANCEL_EXCHANGE_NAME": "nmap_cancel_exchange",
        "NMAP_CANCEL_EXCHANGE_TYPE": "fanout",
        "IP_ENTRY_TTL": "4000",
        "NMAP_OPEN_PORTS_OPTS": "-p- --open",
        "NMAP_SERVICE_OPTS": "-sV -Pn -T4",
        "LOGGER_NAME": "worker_logger",
        "LOGGER_LEVEL": "debug",
    }
    s = config.parse({**BASE, **upstream})
    assert s.unknown_keys == ()
    assert s.backend_base_url == "http://scanledger:443"
    assert s.logger_level == "DEBUG"
    assert s.ip_entry_ttl == 4000


def test_unknown_keys_are_reported_not_refused() -> None:
    s = parsed(RABBITMQ_HOTS="x", ZZZ="1")
    assert s.unknown_keys == ("RABBITMQ_HOTS", "ZZZ")
    assert s.rabbitmq_host == "localhost"


@pytest.mark.parametrize("key", ["RABBITMQ_PORT", "REDIS_PORT"])
@pytest.mark.parametrize("text", ["0", "65536", "-1", "http", "5672.0"])
def test_ports_outside_1_to_65535_are_refused(key: str, text: str) -> None:
    err = refusal(**{key: text})
    assert err.key == key
    assert err.fix == f"set {key} to a number between 1 and 65535"
    assert str(err).startswith(f"{key}: ")


def test_ports_and_numbers_parse() -> None:
    s = parsed(
        RABBITMQ_PORT=" 5671 ", REDIS_PORT="1", REDIS_DB="0", CONCURRENCY="64", SCANLEDGER_TIMEOUT="2.5"
    )
    assert (s.rabbitmq_port, s.redis_port, s.redis_db, s.concurrency) == (5671, 1, 0, 64)
    assert s.scanledger_timeout == 2.5


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("CONCURRENCY", "0"),
        ("CONCURRENCY", "65"),
        ("REDIS_DB", "-1"),
        ("MAX_ATTEMPTS", "0"),
        ("STATUS_TTL", "0"),
        ("LEASE_TTL", "ten"),
        ("SCANLEDGER_TIMEOUT", "0"),
        ("UPLOAD_BACKOFF_MAX", "-5"),
        ("KILL_GRACE", "nan"),
        ("KILL_GRACE", "inf"),
        ("REQUIRE_TASK_METADATA", "maybe"),
        ("LOGGER_LEVEL", "TRACE"),
        ("EXCHANGE_TYPE", "fan-out"),
        ("NMAP_SCAN_QUEUE_NAME", "nmap scan"),
        ("INSTANCE", "../etc"),
        ("INSTANCE", "a" * 33),
        ("NODE_NAME", "w@x"),
        ("HOSTNAME", "scan ner"),
        ("HOSTNAME", "host:1"),
        ("HOSTNAME", "w@host"),
        ("RABBITMQ_HOST", "bad host"),
        ("REDIS_HOST", "-x-"),
        ("WORKER_IP", "300.1.1.1"),
        ("STATS_EVERY", "2 s"),
        ("STATS_EVERY", "0s"),
        ("STATS_EVERY", "2d"),
        ("NMAP_PATH", " "),
        ("RABBITMQ_HOST", ""),
        ("CELERY_APP_NAME", "a\nb"),
    ],
)
def test_bad_values_name_the_key(key: str, text: str) -> None:
    err = refusal(**{key: text})
    assert err.key == key
    assert err.problem
    assert key in err.fix


def test_concurrency_fix_names_the_range() -> None:
    assert refusal(CONCURRENCY="100").fix == "set CONCURRENCY to a number between 1 and 64"


def test_booleans() -> None:
    for text in ("true", "YES", "1", "on"):
        assert parsed(REQUIRE_TASK_METADATA=text).require_task_metadata is True
    for text in ("false", "No", "0", "off"):
        assert parsed(REQUIRE_TASK_METADATA=text).require_task_metadata is False


def test_backend_url_scheme_slash_and_token() -> None:
    s = parsed(BACKEND_BASE_URL="https://ledger.example:8443/api//", WORKER_BACKEND_TOKEN="t")
    assert s.backend_base_url == "https://ledger.example:8443/api"
    for bad in ("ftp://ledger", "ledger.example", "https://", "http://h:70000", "https://h/?a=1"):
        assert refusal(BACKEND_BASE_URL=bad, WORKER_BACKEND_TOKEN="t").key == "BACKEND_BASE_URL"
    err = refusal(BACKEND_BASE_URL="https://ledger.example")
    assert err.key == "WORKER_BACKEND_TOKEN"
    assert "credentials/worker_backend_token" in err.fix


def test_urls_with_credentials_are_refused_without_echo() -> None:
    err = refusal(BACKEND_BASE_URL="https://admin:hunter2@ledger", WORKER_BACKEND_TOKEN="t")
    assert "hunter2" not in str(err)
    err = refusal(IP_ECHO_URL="htps://u:hunter2@ip.example")
    assert "hunter2" not in str(err)
    assert "'htps'" in err.problem


def test_secret_values_are_never_echoed() -> None:
    for key in config.SECRET_KEYS:
        err = refusal(**{key: "s3cr\x07t"})
        assert err.key == key
        assert "s3cr" not in str(err)


def test_settings_repr_hides_secrets() -> None:
    s = parsed(
        RABBITMQ_PASSWORD="rabbit-secret", REDIS_PASS="redis-secret", WORKER_BACKEND_TOKEN="tok-secret"
    )
    assert "secret" not in repr(s)
    assert config.secret_values(s) == ("rabbit-secret", "redis-secret", "tok-secret")
    assert config.secret_values(parsed()) == ()


def test_instance_derives_node_name_and_state_dir() -> None:
    s = parsed(INSTANCE="scan-2")
    assert s.node_name == "workerscan-2"
    assert s.state_dir == Path("/var/lib/falcoria-worker/scan-2")
    s = parsed(INSTANCE="3", NODE_NAME="nmap", STATE_DIR="/srv/fw")
    assert s.node_name == "nmap"
    assert s.state_dir == Path("/srv/fw")


def test_ca_bundle_is_a_path_text_or_none() -> None:
    assert config.ca_bundle(parsed()) is None
    assert config.ca_bundle(parsed(SCANLEDGER_CA_BUNDLE="/etc/ssl/ledger.pem")) == "/etc/ssl/ledger.pem"


def test_hostname_is_required() -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({})
    assert info.value.key == "HOSTNAME"


def test_comma_lists() -> None:
    s = parsed(
        NMAP_ALLOWED_SCRIPTS=" http-title, ssl-cert,,http-title ",
        NMAP_EXTRA_FLAGS="--reason,-v",
        SCOPE_ALLOW="10.0.0.0/8, 192.0.2.7, 2001:db8::/32",
        SCOPE_DENY="10.1.0.0/16",
    )
    assert s.nmap_allowed_scripts == ("http-title", "ssl-cert")
    assert s.nmap_extra_flags == ("--reason", "-v")
    assert s.scope_allow == ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")
    assert s.scope_deny == ("10.1.0.0/16",)


@pytest.mark.parametrize("scripts", ["Http-Title", "http-title.nse", "../x", "a b", "http*"])
def test_script_names_are_checked(scripts: str) -> None:
    assert refusal(NMAP_ALLOWED_SCRIPTS=scripts).key == "NMAP_ALLOWED_SCRIPTS"


@pytest.mark.parametrize("flags", ["--script=x", "-oN /tmp/x", "reason", "--"])
def test_extra_flags_are_checked(flags: str) -> None:
    assert refusal(NMAP_EXTRA_FLAGS=flags).key == "NMAP_EXTRA_FLAGS"


@pytest.mark.parametrize("cidr", ["10.0.0.1/8", "10.0.0.0/33", "example.com", "fe80::1%eth0/64"])
def test_scope_cidrs_are_checked(cidr: str) -> None:
    err = refusal(SCOPE_DENY=cidr)
    assert err.key == "SCOPE_DENY"
    assert repr(cidr) in err.problem


def test_worker_ip_and_hosts() -> None:
    s = parsed(WORKER_IP="2001:db8::0001", RABBITMQ_HOST="[::1]", REDIS_HOST="redis.internal")
    assert s.worker_ip == "2001:db8::1"
    assert s.rabbitmq_host == "::1"
    assert s.redis_host == "redis.internal"


@pytest.mark.parametrize("spec", ["2s", "500ms", "1m", "1h", "3", "0.5s"])
def test_stats_every_takes_nmap_times(spec: str) -> None:
    assert parsed(STATS_EVERY=spec).stats_every == spec


def test_empty_value_for_a_key_with_a_default_is_refused() -> None:
    err = refusal(RABBITMQ_PORT="")
    assert err.key == "RABBITMQ_PORT"
    assert "5672" in err.fix


def test_broker_url_encodes_user_password_and_vhost() -> None:
    s = parsed(
        RABBITMQ_USER="us@r",
        RABBITMQ_PASSWORD="p@ss/w:rd#?%",
        RABBITMQ_VHOST="/",
        RABBITMQ_HOST="rabbit.example",
        RABBITMQ_PORT="5671",
    )
    url = config.broker_url(s)
    assert url == "amqp://us%40r:p%40ss%2Fw%3Ard%23%3F%25@rabbit.example:5671/%2F"
    # kombu must read back exactly what was configured.
    conn = Connection(url)
    assert (conn.userid, conn.password, conn.hostname, conn.port, conn.virtual_host) == (
        "us@r",
        "p@ss/w:rd#?%",
        "rabbit.example",
        5671,
        "/",
    )


def test_broker_url_brackets_ipv6_and_keeps_named_vhost() -> None:
    conn = Connection(config.broker_url(parsed(RABBITMQ_HOST="::1", RABBITMQ_VHOST="falcoria_vhost")))
    assert (conn.hostname, conn.virtual_host) == ("::1", "falcoria_vhost")


def test_redis_kwargs() -> None:
    assert config.redis_kwargs(parsed(REDIS_HOST="r", REDIS_PORT="6380", REDIS_DB="5", REDIS_PASS="pw")) == {
        "host": "r",
        "port": 6380,
        "db": 5,
        "password": "pw",
        "ssl": False,
    }
    assert config.redis_kwargs(parsed())["password"] is None
    assert config.redis_kwargs(parsed(REDIS_SSL="true"))["ssl"] is True


def test_tls_to_the_broker_is_a_checked_bool() -> None:
    assert parsed(RABBITMQ_SSL="yes").rabbitmq_ssl is True
    assert parsed().rabbitmq_ssl is False
    with pytest.raises(ConfigError, match="RABBITMQ_SSL"):
        parsed(RABBITMQ_SSL="maybe")


def test_amqp_tls_checks_the_host_name_and_sends_the_client_certificate() -> None:
    from falcoria_worker.broker import tls_options

    assert tls_options(parsed()) is False
    assert tls_options(parsed(RABBITMQ_SSL="true", RABBITMQ_HOST="mq.example")) == {
        "server_hostname": "mq.example",
        "cert_reqs": ssl.CERT_REQUIRED,
    }
    s = parsed(RABBITMQ_SSL="true", RABBITMQ_SSL_CERTFILE="/c.pem", RABBITMQ_SSL_KEYFILE="/k.pem")
    assert tls_options(s)["certfile"] == "/c.pem"  # type: ignore[index]
    assert tls_options(s)["keyfile"] == "/k.pem"  # type: ignore[index]


def test_client_certificates_need_tls_and_a_certificate_for_the_key() -> None:
    s = parsed(REDIS_SSL="true", REDIS_SSL_CERTFILE="/c.pem", REDIS_SSL_KEYFILE="/k.pem")
    kwargs = config.redis_kwargs(s)
    assert (kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == ("/c.pem", "/k.pem")
    both = parsed(REDIS_SSL="true", REDIS_SSL_CERTFILE="/both.pem")
    assert config.redis_kwargs(both)["ssl_keyfile"] is None
    assert "ssl_certfile" not in config.redis_kwargs(parsed(REDIS_SSL="true"))
    with pytest.raises(ConfigError, match="RABBITMQ_SSL_KEYFILE") as info:
        parsed(RABBITMQ_SSL="true", RABBITMQ_SSL_KEYFILE="/k.pem")
    assert "RABBITMQ_SSL_CERTFILE" in info.value.fix
    with pytest.raises(ConfigError, match="REDIS_SSL_CERTFILE") as info:
        parsed(REDIS_SSL_CERTFILE="/c.pem")
    assert "REDIS_SSL=true" in info.value.fix


def test_shown_value_masks_secrets_and_renders_types() -> None:
    s = parsed(WORKER_BACKEND_TOKEN="tok", SCOPE_DENY="10.0.0.0/8,10.2.0.0/16")
    assert config.shown_value(s, "WORKER_BACKEND_TOKEN") == "***"
    assert config.shown_value(s, "REDIS_PASS") == "(unset)"
    assert config.shown_value(s, "SCOPE_DENY") == "10.0.0.0/8,10.2.0.0/16"
    assert config.shown_value(s, "REQUIRE_TASK_METADATA") == "true"
    assert config.shown_value(s, "SCANLEDGER_TIMEOUT") == "60"
    assert config.shown_value(s, "BACKEND_BASE_URL") == ""
    assert config.shown_value(s, "STATE_DIR") == "/var/lib/falcoria-worker/1"


def test_every_default_parses_to_what_shown_value_prints() -> None:
    # DEFAULTS are documented in worker.conf; printing them back must give the same text.
    s = parsed()
    for key, default in config.DEFAULTS.items():
        if key in config.DERIVED_KEYS or key in config.SECRET_KEYS:
            continue
        assert config.shown_value(s, key) == default, key


WORKER_CONF = Path(__file__).parents[2] / "packaging" / "debian" / "worker.conf"


def test_worker_conf_documents_every_key_with_its_default() -> None:
    # The shipped file lists each setting as "#KEY=default"; it and config.py must not drift apart.
    documented = {}
    for line in WORKER_CONF.read_text().splitlines():
        match = re.fullmatch(r"#([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            assert match[1] not in documented, f"{match[1]} documented twice"
            documented[match[1]] = match[2]
    assert set(documented) == set(config.KNOWN_KEYS)
    assert documented == dict(config.DEFAULTS)
    for key in config.SECRET_KEYS:
        assert f"/etc/falcoria-worker/credentials/{key.lower()}" in WORKER_CONF.read_text()
