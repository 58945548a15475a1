"""settings_io.py: KEY=VALUE files, layering, environment, secrets from files and credentials, masking."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from falcoria_worker import config
from falcoria_worker.errors import ConfigError
from falcoria_worker.settings_io import describe, load, parse_env_text


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    directory = tmp_path / "etc"
    directory.mkdir()
    return directory


def write(path: Path, text: str, mode: int = 0o640) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# --- KEY=VALUE files ------------------------------------------------------------------------------------


def test_env_file_syntax() -> None:
    text = (
        "# comment\n"
        "; also a comment\n"
        "\n"
        "   RABBITMQ_HOST = rabbit.example   \n"
        "rabbitmq_port=5671\r\n"
        'export REDIS_PASS="a \\"quoted\\" \\\\ \\$x \\n"\n'
        "REDIS_HOST='single # not a comment \\ kept'\n"
        "NMAP_SERVICE_OPTS=-sV -Pn # stays part of the value\n"
        "RABBITMQ_PASSWORD=p\\ \\\\w\n"
        "EMPTY=\n"
        'QUOTED_EMPTY=""\n'
        "SPACES=a\\ \n"
    )
    assert parse_env_text(text, "f") == [
        ("RABBITMQ_HOST", "rabbit.example", 4),
        ("RABBITMQ_PORT", "5671", 5),
        ("REDIS_PASS", 'a "quoted" \\ $x \\n', 6),
        ("REDIS_HOST", "single # not a comment \\ kept", 7),
        ("NMAP_SERVICE_OPTS", "-sV -Pn # stays part of the value", 8),
        ("RABBITMQ_PASSWORD", "p \\w", 9),
        ("EMPTY", "", 10),
        ("QUOTED_EMPTY", "", 11),
        ("SPACES", "a ", 12),
    ]


one_line_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40)


@given(one_line_text)
def test_double_quoted_values_round_trip(value: str) -> None:
    # What an installer writing worker.conf does: escape \ " $ ` inside double quotes, as systemd reads them.
    escaped = "".join("\\" + c if c in '\\"$`' else c for c in value)
    assert parse_env_text(f'KEY="{escaped}"', "f") == [("KEY", value, 1)]


@given(one_line_text.filter(lambda v: "'" not in v))
def test_single_quoted_values_are_literal(value: str) -> None:
    assert parse_env_text(f"KEY='{value}'", "f") == [("KEY", value, 1)]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("hunter2", "is not KEY=VALUE"),
        ("my pass=hunter2", "not a setting name"),
        ("1KEY=hunter2", "not a setting name"),
        ('KEY="hunter2', "no closing double quote"),
        ("KEY='hunter2", "no closing single quote"),
        ('KEY="hunter2" x', "text after the closing quote"),
        ("KEY=hunter2\\", "continues on the next line"),
        ('KEY="hunter2\\', "continues on the next line"),
    ],
)
def test_malformed_lines_name_file_and_line_without_echo(line: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_env_text(f"# ok\n{line}\n", "/etc/falcoria-worker/worker.conf")
    assert info.value.key == "/etc/falcoria-worker/worker.conf:2"
    assert problem in info.value.problem
    assert "hunter2" not in str(info.value)


# --- layering -------------------------------------------------------------------------------------------


def test_defaults_only(etc: Path) -> None:
    loaded = load(environ={}, etc_dir=etc)
    assert loaded.settings.hostname == socket.gethostname()
    assert loaded.settings.state_dir == Path("/var/lib/falcoria-worker/1")
    assert set(loaded.sources.values()) == {"default"}
    assert loaded.warnings == ()


def test_layers_in_order(etc: Path, tmp_path: Path) -> None:
    write(
        etc / "worker.conf",
        "RABBITMQ_HOST=from-conf\nREDIS_HOST=from-conf\nREDIS_PORT=1\nREDIS_DB=1\nCONCURRENCY=1\nKILL_GRACE=1\n",
    )
    write(etc / "worker@7.conf", "REDIS_HOST=from-instance\nREDIS_PORT=2\nREDIS_DB=2\nCONCURRENCY=2\n")
    extra = write(tmp_path / "extra.conf", "REDIS_PORT=3\nREDIS_DB=3\nCONCURRENCY=3\n")
    loaded = load(
        instance="7",
        config_files=[extra],
        environ={"redis_db": "4", "CONCURRENCY": "4", "PATH": "/bin", "SOMETHING_ELSE": "x"},
        overrides={"concurrency": "5"},
        etc_dir=etc,
    )
    s = loaded.settings
    assert (s.rabbitmq_host, s.redis_host, s.redis_port, s.redis_db, s.concurrency, s.kill_grace) == (
        "from-conf",
        "from-instance",
        3,
        4,
        5,
        1,
    )
    assert s.instance == "7"
    assert s.node_name == "worker7"
    assert loaded.sources["RABBITMQ_HOST"] == f"{etc / 'worker.conf'}:1"
    assert loaded.sources["REDIS_HOST"] == f"{etc / 'worker@7.conf'}:1"
    assert loaded.sources["REDIS_PORT"] == f"{extra}:1"
    assert loaded.sources["REDIS_DB"] == "env"
    assert loaded.sources["CONCURRENCY"] == "--set"
    assert loaded.sources["INSTANCE"] == "--instance"
    assert loaded.sources["EXCHANGE_NAME"] == "default"
    assert s.unknown_keys == ()


def test_instance_file_follows_instance_from_other_layers(etc: Path) -> None:
    write(etc / "worker.conf", "INSTANCE=b\n")
    write(etc / "worker@b.conf", "CONCURRENCY=9\n")
    write(etc / "worker@1.conf", "CONCURRENCY=1\n")
    assert load(environ={}, etc_dir=etc).settings.concurrency == 9
    assert load(environ={"INSTANCE": "1"}, etc_dir=etc).settings.concurrency == 1


def test_instance_file_cannot_name_another_instance(etc: Path) -> None:
    write(etc / "worker@2.conf", "INSTANCE=3\n")
    with pytest.raises(ConfigError) as info:
        load(instance="2", environ={}, etc_dir=etc)
    assert info.value.key == "INSTANCE"


def test_instance_name_is_checked_before_it_becomes_a_path(etc: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(instance="../../tmp/x", environ={}, etc_dir=etc)
    assert info.value.key == "INSTANCE"


def test_missing_optional_files_are_fine_but_missing_config_is_not(etc: Path, tmp_path: Path) -> None:
    load(instance="2", environ={}, etc_dir=etc / "nowhere")
    with pytest.raises(ConfigError) as info:
        load(config_files=[tmp_path / "absent.conf"], environ={}, etc_dir=etc)
    assert info.value.key == str(tmp_path / "absent.conf")


def test_unreadable_worker_conf_is_a_clear_error(etc: Path) -> None:
    # A directory stands in for an unreadable file: root reads any file whatever its mode.
    (etc / "worker.conf").mkdir()
    with pytest.raises(ConfigError) as info:
        load(environ={}, etc_dir=etc)
    assert info.value.key == str(etc / "worker.conf")
    assert "cannot read the settings file" in info.value.problem


def test_environment_is_case_insensitive_and_only_known_keys(etc: Path) -> None:
    loaded = load(
        environ={"rabbitmq_host": "lower", "Redis_Port": "6390", "RABBITMQ_HOTS": "typo"}, etc_dir=etc
    )
    assert loaded.settings.rabbitmq_host == "lower"
    assert loaded.settings.redis_port == 6390
    assert loaded.settings.unknown_keys == ()


def test_environment_name_twice_with_different_values_is_refused(etc: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(environ={"rabbitmq_host": "a", "RABBITMQ_HOST": "b"}, etc_dir=etc)
    assert info.value.key == "RABBITMQ_HOST"
    assert (
        load(environ={"rabbitmq_host": "a", "RABBITMQ_HOST": "a"}, etc_dir=etc).settings.rabbitmq_host == "a"
    )


def test_upstream_dotenv_loads_as_an_extra_file(etc: Path, tmp_path: Path) -> None:
    dotenv = write(
        tmp_path / ".env",
        "rabbitmq_user=falcoria\nrabbitmq_password=rabbitpw\nredis_pass=redispw\n"
        "worker_backend_token=tok\nrabbitmq_host=rabbit\nredis_host=redis\n"
        "backend_base_url=http://scanledger:443/\nlogger_level=DEBUG\n",
        0o600,
    )
    s = load(config_files=[dotenv], environ={}, etc_dir=etc).settings
    assert (s.rabbitmq_user, s.rabbitmq_password, s.redis_pass, s.worker_backend_token) == (
        "falcoria",
        "rabbitpw",
        "redispw",
        "tok",
    )
    assert s.backend_base_url == "http://scanledger:443"


def test_state_directory_from_systemd(etc: Path) -> None:
    s = load(environ={"STATE_DIRECTORY": "/var/lib/falcoria-worker/2:/var/lib/other"}, etc_dir=etc)
    assert s.settings.state_dir == Path("/var/lib/falcoria-worker/2")
    assert s.sources["STATE_DIR"] == "$STATE_DIRECTORY"
    s = load(environ={"STATE_DIRECTORY": "/var/lib/x", "STATE_DIR": "/srv/fw"}, etc_dir=etc)
    assert s.settings.state_dir == Path("/srv/fw")


def test_hostname_env_overrides_like_upstream(etc: Path) -> None:
    assert load(environ={"HOSTNAME": "scanner-7"}, etc_dir=etc).settings.hostname == "scanner-7"


def test_parse_errors_say_where_the_value_came_from(etc: Path) -> None:
    write(etc / "worker.conf", "\nRABBITMQ_PORT=http\n")
    with pytest.raises(ConfigError) as info:
        load(environ={}, etc_dir=etc)
    assert info.value.key == "RABBITMQ_PORT"
    assert f"(from {etc / 'worker.conf'}:2)" in info.value.problem
    assert info.value.fix == "set RABBITMQ_PORT to a number between 1 and 65535"


def test_unknown_keys_are_reported_with_a_suggestion(etc: Path) -> None:
    write(etc / "worker.conf", "RABBITMQ_HOTS=x\n")
    loaded = load(environ={}, overrides={"CONCURENCY": "2"}, etc_dir=etc)
    assert loaded.settings.unknown_keys == ("CONCURENCY", "RABBITMQ_HOTS")
    assert loaded.warnings == (
        f"{etc / 'worker.conf'}:1: RABBITMQ_HOTS is not a setting and is ignored"
        " (did you mean RABBITMQ_HOST?)",
        "--set: CONCURENCY is not a setting and is ignored (did you mean CONCURRENCY?)",
    )


# --- secrets --------------------------------------------------------------------------------------------


def test_secret_file_keys(etc: Path, tmp_path: Path) -> None:
    token = write(tmp_path / "token", "tok-from-file\n", 0o600)
    write(etc / "worker.conf", f"WORKER_BACKEND_TOKEN_FILE={token}\n")
    loaded = load(environ={}, etc_dir=etc)
    assert loaded.settings.worker_backend_token == "tok-from-file"
    assert (
        loaded.sources["WORKER_BACKEND_TOKEN"]
        == f"WORKER_BACKEND_TOKEN_FILE={token} ({etc / 'worker.conf'}:1)"
    )
    # From the environment too (case-insensitive), and a higher value layer still wins over it.
    env = {"redis_pass_file": str(token)}
    assert load(environ=env, etc_dir=etc).settings.redis_pass == "tok-from-file"
    assert load(environ=env, overrides={"REDIS_PASS": "x"}, etc_dir=etc).settings.redis_pass == "x"


def test_secret_file_only_read_when_its_layer_wins(etc: Path, tmp_path: Path) -> None:
    write(etc / "worker.conf", f"REDIS_PASS_FILE={tmp_path / 'absent'}\n")
    assert load(environ={"REDIS_PASS": "env"}, etc_dir=etc).settings.redis_pass == "env"
    with pytest.raises(ConfigError) as info:
        load(environ={}, etc_dir=etc)
    assert info.value.key == "REDIS_PASS"
    assert "REDIS_PASS_FILE" in info.value.problem


def test_value_and_file_in_one_layer_are_refused(etc: Path) -> None:
    write(etc / "worker.conf", "REDIS_PASS=a\nREDIS_PASS_FILE=/x\n")
    with pytest.raises(ConfigError) as info:
        load(environ={}, etc_dir=etc)
    assert info.value.key == "REDIS_PASS"
    assert "REDIS_PASS_FILE" in info.value.problem


def test_credentials_beat_files_and_environment_but_not_set(etc: Path, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "worker_backend_token", "cred-token\n", 0o400)
    # The shipped unit loads the directory under the ID "falcoria-worker": systemd prefixes the names.
    write(creds / "falcoria-worker_rabbitmq_password", "cred-rabbit\r\n", 0o400)
    write(etc / "worker.conf", "WORKER_BACKEND_TOKEN=conf-token\nREDIS_PASS=conf-redis\n", 0o600)
    environ = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "WORKER_BACKEND_TOKEN": "env-token",
        "RABBITMQ_PASSWORD": "e",
    }
    loaded = load(environ=environ, etc_dir=etc)
    s = loaded.settings
    assert (s.worker_backend_token, s.rabbitmq_password, s.redis_pass) == (
        "cred-token",
        "cred-rabbit",
        "conf-redis",
    )
    assert loaded.sources["WORKER_BACKEND_TOKEN"] == "credential"
    assert loaded.sources["RABBITMQ_PASSWORD"] == "credential"
    overridden = load(environ=environ, overrides={"WORKER_BACKEND_TOKEN": "cli"}, etc_dir=etc)
    assert overridden.settings.worker_backend_token == "cli"


def test_outside_the_unit_the_credentials_come_from_the_directory_the_unit_loads(
    etc: Path, tmp_path: Path
) -> None:
    (etc / "credentials").mkdir(mode=0o700)
    write(etc / "credentials" / "redis_pass", "root-only\n", 0o600)
    loaded = load(environ={}, etc_dir=etc)
    assert (loaded.settings.redis_pass, loaded.sources["REDIS_PASS"]) == ("root-only", "credential")
    # Under the unit, systemd's copy alone.
    (tmp_path / "copy").mkdir()
    write(tmp_path / "copy" / "falcoria-worker_redis_pass", "copied\n", 0o400)
    under_unit = load(environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "copy")}, etc_dir=etc)
    assert under_unit.settings.redis_pass == "copied"


def test_tls_client_key_comes_from_a_credential_as_a_path(etc: Path, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    key = write(creds / "falcoria-worker_redis_ssl_keyfile", "-----BEGIN PRIVATE KEY-----\n", 0o400)
    write(etc / "worker.conf", "REDIS_SSL=true\nREDIS_SSL_CERTFILE=/etc/ssl/c.pem\nREDIS_SSL_KEYFILE=/x\n")
    loaded = load(environ={"CREDENTIALS_DIRECTORY": str(creds)}, etc_dir=etc)
    assert loaded.settings.redis_ssl_keyfile == key
    assert loaded.settings.redis_ssl_certfile == Path("/etc/ssl/c.pem")
    assert loaded.sources["REDIS_SSL_KEYFILE"] == "credential"
    assert loaded.settings.rabbitmq_ssl_keyfile is None


def test_only_one_trailing_newline_is_stripped(etc: Path, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    write(creds / "redis_pass", "pw \n", 0o400)
    assert load(environ=environ, etc_dir=etc).settings.redis_pass == "pw "
    # A second newline would become part of the password: refused rather than guessed at.
    write(creds / "redis_pass", "pw\n\n", 0o400)
    with pytest.raises(ConfigError) as info:
        load(environ=environ, etc_dir=etc)
    assert info.value.key == "REDIS_PASS"
    assert "pw" not in str(info.value).replace("(from credential)", "")


def test_oversized_or_binary_secret_files_are_refused_without_echo(etc: Path, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis_pass").write_bytes(b"\xffhunter2")
    with pytest.raises(ConfigError) as info:
        load(environ={"CREDENTIALS_DIRECTORY": str(creds)}, etc_dir=etc)
    assert "hunter2" not in str(info.value)
    (creds / "redis_pass").write_text("x" * (64 * 1024 + 1))
    with pytest.raises(ConfigError):
        load(environ={"CREDENTIALS_DIRECTORY": str(creds)}, etc_dir=etc)


def test_world_readable_file_with_a_secret_warns(etc: Path) -> None:
    write(etc / "worker.conf", "REDIS_PASS=hunter2\n", 0o644)
    loaded = load(environ={}, etc_dir=etc)
    assert len(loaded.warnings) == 1
    assert "REDIS_PASS" in loaded.warnings[0]
    assert "credentials/<lower-case key>" in loaded.warnings[0]
    assert "hunter2" not in loaded.warnings[0]
    write(etc / "worker.conf", "REDIS_PASS=hunter2\n", 0o640)
    assert load(environ={}, etc_dir=etc).warnings == ()


def test_describe_masks_secrets_and_lists_every_key(etc: Path) -> None:
    loaded = load(
        environ={"REDIS_PASS": "hunter2", "WORKER_BACKEND_TOKEN": "t0ken", "BACKEND_BASE_URL": "https://l"},
        etc_dir=etc,
    )
    rows = describe(loaded)
    assert [key for key, _, _ in rows] == list(config.KNOWN_KEYS)
    shown = {key: (value, source) for key, value, source in rows}
    assert shown["REDIS_PASS"] == ("***", "env")
    assert shown["WORKER_BACKEND_TOKEN"] == ("***", "env")
    assert shown["RABBITMQ_PASSWORD"] == ("(unset)", "default")
    assert shown["BACKEND_BASE_URL"] == ("https://l", "env")
    assert "hunter2" not in repr(rows)
    assert "t0ken" not in repr(rows)


def test_shipped_worker_conf_loads_without_warnings(etc: Path) -> None:
    shipped = Path(__file__).parents[2] / "packaging" / "debian" / "worker.conf"
    write(etc / "worker.conf", shipped.read_text())
    loaded = load(environ={}, etc_dir=etc)
    assert loaded.warnings == ()
    assert set(loaded.sources.values()) == {"default"}


def test_loaded_settings_repr_holds_no_secret(etc: Path, tmp_path: Path) -> None:
    token = write(tmp_path / "token", "t0ken-from-file\n", 0o600)
    write(etc / "worker.conf", f"REDIS_PASS=hunter2\nWORKER_BACKEND_TOKEN_FILE={token}\n", 0o644)
    loaded = load(environ={"RABBITMQ_PASSWORD": "rabbit-pw"}, etc_dir=etc)
    assert loaded.settings.redis_pass == "hunter2"
    text = repr(loaded) + repr(describe(loaded))
    for secret in ("hunter2", "t0ken-from-file", "rabbit-pw"):
        assert secret not in text


def test_load_applies_the_layers_in_the_documented_order(tmp_path: Path) -> None:
    # REDIS_PASS can come from every layer but the two ends; each layer gives it its own name as value.
    # With the layers above k taken away, layer k must win: the order of config.LAYERS is the order applied.
    holders = ["worker.conf", "worker@INSTANCE.conf", "--config", "environment", "credentials", "--set"]
    names = [name for name, _ in config.LAYERS]
    assert [name for name in names if name in holders] == holders
    assert names == ["defaults", *holders, "--instance"]
    for count in range(1, len(holders) + 1):
        root = tmp_path / str(count)
        etc = root / "etc"
        etc.mkdir(parents=True)
        environ: dict[str, str] = {}
        overrides: dict[str, str] = {}
        config_files = []
        for name in holders[:count]:
            if name == "worker.conf":
                write(etc / "worker.conf", f"REDIS_PASS={name}\n")
            elif name == "worker@INSTANCE.conf":
                write(etc / "worker@1.conf", f"REDIS_PASS={name}\n")
            elif name == "--config":
                config_files.append(write(root / "extra.conf", f"REDIS_PASS={name}\n"))
            elif name == "environment":
                environ["REDIS_PASS"] = name
            elif name == "credentials":
                (root / "creds").mkdir()
                write(root / "creds" / "redis_pass", name, 0o400)
                environ["CREDENTIALS_DIRECTORY"] = str(root / "creds")
            else:
                overrides["REDIS_PASS"] = name
        loaded = load(environ=environ, overrides=overrides, config_files=config_files, etc_dir=etc)
        assert loaded.settings.redis_pass == holders[count - 1]
    nothing = tmp_path / "empty"
    nothing.mkdir()
    assert load(environ={}, etc_dir=nothing).settings.redis_pass == ""  # the defaults
    ranked = load(instance="top", overrides={"INSTANCE": "set"}, environ={}, etc_dir=nothing)
    assert ranked.settings.instance == "top"
