"""Where settings come from: files, environment, credentials and the command line, layered.

The layers and their order are `config.LAYERS`, lowest first: a key takes its value from the highest layer
that names it. `load()` merges them in that order, and the settings reference is generated from it.
The credential layer is `$CREDENTIALS_DIRECTORY/<lower-case key>` (systemd LoadCredential=); for the
TLS client certificate and key settings it holds the path of that file.

Secrets (config.SECRET_KEYS) follow the same rule. `<KEY>_FILE=/path` counts as a value of its own layer
(the file is read only if that layer wins), and the credentials directory is a layer of its own just above
the environment: the unit loads credentials on purpose, so they beat every file and variable, and only an
explicit --set on the command line beats them. A layer that sets both KEY and KEY_FILE is refused.

Files are KEY=VALUE as systemd's EnvironmentFile= reads them: `#`/`;` comments, blank lines, optional
"double" (\\" \\\\ \\$ \\` escapes) or 'single' quotes, a backslash escaping the next character outside
quotes, no comment after a value. `export KEY=...` is tolerated so a shell-style .env loads. Multi-line
values are refused rather than guessed at.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from falcoria_worker import config, setting_checks
from falcoria_worker.errors import ConfigError

ETC_DIR = Path("/etc/falcoria-worker")
CREDENTIALS_HELP = "/etc/falcoria-worker/credentials/<lower-case key>"
# The unit loads the whole credentials directory under one ID, and systemd names each file "<ID>_<file>".
_CREDENTIAL_PREFIX = "falcoria-worker_"
_SECRET_FILE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class LoadedSettings:
    settings: config.Settings
    sources: Mapping[str, str]  # KEY -> "default", "<file>:<line>", "env", "credential", "--set", ...
    warnings: tuple[str, ...]  # unknown keys (with a suggestion), secrets in world-readable files


@dataclass(frozen=True)
class _Entry:
    value: str  # unused when `file` is set
    source: str
    file: Path | None = None  # a secret to read from this file, if this entry wins


_Layer = dict[str, _Entry]


# --- KEY=VALUE files ------------------------------------------------------------------------------------


def parse_env_text(text: str, origin: str) -> list[tuple[str, str, int]]:
    """(KEY upper-cased, value, line number) for each assignment. Pure; `origin` names the file in errors.

    Errors never quote the line: it may hold a secret.
    """
    assignments = []
    for number, line in enumerate(text.split("\n"), start=1):
        where = f"{origin}:{number}"
        # Only leading blanks go here: a trailing escaped blank ("a\ ") belongs to the value.
        body = line.lstrip(" \t")
        if not body.rstrip(" \t\r") or body[0] in "#;":
            continue
        if body.startswith(("export ", "export\t")):
            body = body[len("export") :].lstrip(" \t")
        name, equals, rest = body.partition("=")
        name = name.rstrip(" \t")
        if not equals:
            raise ConfigError(
                where, "is not KEY=VALUE", "write KEY=VALUE, or start the line with # to comment it out"
            )
        if not name.isidentifier() or not name.isascii():
            raise ConfigError(
                where, "the name before '=' is not a setting name", "use names like RABBITMQ_HOST"
            )
        assignments.append((name.upper(), _env_value(rest.lstrip(" \t"), where), number))
    return assignments


_DOUBLE_QUOTE_ESCAPES = '"\\`$'


def _env_value(raw: str, where: str) -> str:
    multi_line = ConfigError(where, "continues on the next line", "put the whole value on one line")
    if raw[:1] == "'":
        end = raw.find("'", 1)
        if end < 0:
            raise ConfigError(where, "has no closing single quote", "close the quote on the same line")
        value, tail = raw[1:end], raw[end + 1 :]
    elif raw[:1] == '"':
        chars: list[str] = []
        index = 1
        while True:
            if index >= len(raw):
                raise ConfigError(where, "has no closing double quote", "close the quote on the same line")
            char = raw[index]
            if char == '"':
                break
            if char == "\\":
                if index + 1 >= len(raw):
                    raise multi_line
                following = raw[index + 1]
                chars.append(following if following in _DOUBLE_QUOTE_ESCAPES else "\\" + following)
                index += 2
                continue
            chars.append(char)
            index += 1
        value, tail = "".join(chars), raw[index + 1 :]
    else:
        return _unquoted(raw, multi_line)
    if tail.strip(" \t\r"):
        # systemd would glue the text after the quote on; that is never what a reader of the file expects.
        raise ConfigError(where, "has text after the closing quote", "quote the whole value")
    return value


def _unquoted(raw: str, multi_line: ConfigError) -> str:
    chars: list[str] = []
    kept = 0  # length up to the last escaped or non-blank character: trailing blanks are dropped
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\\":
            if index + 1 >= len(raw):
                raise multi_line
            chars.append(raw[index + 1])
            kept = len(chars)
            index += 2
            continue
        chars.append(char)
        if char not in " \t\r":
            kept = len(chars)
        index += 1
    return "".join(chars[:kept])


def _read_text(path: Path, *, what: str, fix: str, limit: int | None = None) -> str | None:
    """File contents, None if it does not exist; any other failure names the file."""
    try:
        with path.open("rb") as handle:
            data = handle.read() if limit is None else handle.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read {what} ({exc.strerror})", fix) from None
    if limit is not None and len(data) > limit:
        raise ConfigError(
            str(path), f"{what} is larger than {limit} bytes", "check the file holds only the secret"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), f"{what} is not UTF-8 text", "save it as UTF-8") from None
    if "\0" in text:
        raise ConfigError(str(path), f"{what} contains a NUL byte", "save it as plain text")
    return text


def _file_layer(path: Path, *, required: bool, warnings: list[str]) -> _Layer:
    text = _read_text(
        path,
        what="the settings file",
        fix="make it readable by the falcoria-worker group (root:falcoria-worker, mode 0640)",
    )
    if text is None:
        if required:
            raise ConfigError(str(path), "does not exist", "give --config an existing KEY=VALUE file")
        return {}
    layer = {key: _Entry(value, f"{path}:{line}") for key, value, line in parse_env_text(text, str(path))}
    _file_key_entries(layer)
    exposed = sorted(key for key in config.SECRET_KEYS if key in layer and layer[key].value)
    if exposed and _world_readable(path):
        warnings.append(
            f"{path} holds {', '.join(exposed)} and every user can read it;"
            f" move secrets to {CREDENTIALS_HELP}"
        )
    return layer


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o004)
    except OSError:
        return False


# --- the other layers -----------------------------------------------------------------------------------


def _file_key_entries(layer: _Layer) -> None:
    """Turn KEY_FILE=/path entries of one layer into deferred KEY entries (read only if this layer wins)."""
    for file_key, key in config.FILE_KEYS.items():
        entry = layer.pop(file_key, None)
        if entry is None or not entry.value:
            continue
        if key in layer:
            raise ConfigError(
                key, f"is set both as {key} and as {file_key} ({entry.source})", "keep one of them"
            )
        layer[key] = _Entry("", f"{file_key}={entry.value} ({entry.source})", Path(entry.value))


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    """Known settings from the environment, names case-insensitive like upstream's pydantic-settings."""
    wanted = set(config.KNOWN_KEYS) | set(config.FILE_KEYS)
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        key = name.upper()
        if key not in wanted:
            continue
        if key in found and found[key][1] != value:
            raise ConfigError(
                key,
                f"is set twice in the environment with different values ({found[key][0]} and {name})",
                "unset one of them",
            )
        found[key] = (name, value)
    layer = {key: _Entry(value, "env") for key, (_, value) in found.items()}
    _file_key_entries(layer)
    return layer


def _credential_layer(environ: Mapping[str, str], etc_dir: Path) -> _Layer:
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        # Outside the unit (an operator's `check` or `drain` as root) the directory the unit loads its
        # credentials from, when this user may read it: the commands then see what the instances see.
        source = etc_dir / "credentials"
        if not os.access(source, os.R_OK | os.X_OK):
            return {}
        directory = str(source)
    layer = {}
    for key in sorted(config.SECRET_KEYS):
        for name in (key.lower(), _CREDENTIAL_PREFIX + key.lower()):
            value = _read_secret(Path(directory) / name, key)
            if value is not None:
                layer[key] = _Entry(value, "credential")
                break
    # TLS certificates and keys are handed to the TLS library as files: the credential's path is the value.
    for key in config.TLS_FILE_KEYS:
        for name in (key.lower(), _CREDENTIAL_PREFIX + key.lower()):
            path = Path(directory) / name
            if path.is_file():
                layer[key] = _Entry(str(path), "credential")
                break
    return layer


def _read_secret(path: Path, key: str) -> str | None:
    text = _read_text(
        path, what=f"the secret for {key}", fix="make it readable by the worker", limit=_SECRET_FILE_LIMIT
    )
    if text is None:
        return None
    # One trailing newline is how editors and `echo` end a file; it is never part of a password.
    return text.removesuffix("\n").removesuffix("\r")


def _default_layer(environ: Mapping[str, str]) -> _Layer:
    layer = {"HOSTNAME": _Entry(socket.gethostname(), "default")}
    # systemd's StateDirectory=; several directories are colon-separated and the unit lists ours first.
    state_directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        layer["STATE_DIR"] = _Entry(state_directory, "$STATE_DIRECTORY")
    return layer


# --- load -----------------------------------------------------------------------------------------------


def _in_order(by_name: Mapping[str, list[_Layer]], skip: str = "") -> list[_Layer]:
    """The layers in `config.LAYERS` order; a name without a loader fails here, not silently."""
    return [layer for name, _ in config.LAYERS if name != skip for layer in by_name[name]]


def _merge(layers: Iterable[_Layer]) -> dict[str, _Entry]:
    merged: dict[str, _Entry] = {}
    for layer in layers:
        merged.update(layer)
    return merged


def _unknown_key_warnings(layers: Iterable[_Layer]) -> list[str]:
    known = [*config.KNOWN_KEYS, *config.FILE_KEYS]
    warnings = []
    for layer in layers:
        for key, entry in layer.items():
            if key in config.KNOWN_KEYS:
                continue
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{entry.source}: {key} is not a setting and is ignored{hint}")
    return warnings


def load(
    *,
    instance: str | None = None,
    overrides: Mapping[str, str] | None = None,
    config_files: Iterable[str | Path] = (),
    environ: Mapping[str, str] = os.environ,
    etc_dir: Path = ETC_DIR,
) -> LoadedSettings:
    """Read every layer, resolve secrets and parse. Raises ConfigError naming the key or file:line."""
    warnings: list[str] = []
    base = _file_layer(etc_dir / "worker.conf", required=False, warnings=warnings)
    extra = [_file_layer(Path(path), required=True, warnings=warnings) for path in config_files]
    command_line = {key.upper(): _Entry(value, "--set") for key, value in (overrides or {}).items()}
    by_name: dict[str, list[_Layer]] = {
        "defaults": [_default_layer(environ)],
        "worker.conf": [base],
        "--config": extra,
        "environment": [_env_layer(environ)],
        "credentials": [_credential_layer(environ, etc_dir)],
        "--set": [command_line],
        "--instance": [{"INSTANCE": _Entry(instance, "--instance")} if instance is not None else {}],
    }
    _file_key_entries(command_line)

    # The per-instance file is chosen by the INSTANCE every other layer agrees on, so it cannot pick itself.
    chosen_entry = _merge(_in_order(by_name, skip="worker@INSTANCE.conf")).get("INSTANCE")
    chosen = (
        setting_checks.check_instance("INSTANCE", chosen_entry.value)
        if chosen_entry
        else config.DEFAULTS["INSTANCE"]
    )
    per_instance = _file_layer(etc_dir / f"worker@{chosen}.conf", required=False, warnings=warnings)
    if "INSTANCE" in per_instance and per_instance["INSTANCE"].value != chosen:
        raise ConfigError(
            "INSTANCE",
            f"{per_instance['INSTANCE'].source} names another instance than {chosen!r}",
            "remove INSTANCE from the per-instance file: its file name already says which instance it is for",
        )
    by_name["worker@INSTANCE.conf"] = [per_instance]

    warnings[:0] = _unknown_key_warnings([base, per_instance, *extra, command_line])
    merged = _merge(_in_order(by_name))
    values = {}
    for key, entry in merged.items():
        if entry.file is None:
            values[key] = entry.value
        else:
            secret = _read_secret(entry.file, key)
            if secret is None:
                raise ConfigError(
                    key, f"{entry.source}: the file does not exist", f"create it or unset {key}_FILE"
                )
            values[key] = secret
    try:
        settings = config.parse(values)
    except ConfigError as exc:
        where = merged.get(exc.key)
        if where is None:
            raise
        raise ConfigError(exc.key, f"{exc.problem} (from {where.source})", exc.fix) from None
    sources = {key: merged[key].source if key in merged else "default" for key in config.KNOWN_KEYS}
    return LoadedSettings(settings, sources, tuple(warnings))


def describe(loaded: LoadedSettings) -> list[tuple[str, str, str]]:
    """(KEY, value as shown, source) for every setting; secrets are "***", or "(unset)" when empty."""
    settings = loaded.settings
    rows = [(key, config.shown_value(settings, key), loaded.sources[key]) for key in config.KNOWN_KEYS]
    if settings.hostname != settings.machine_hostname:
        # HOSTNAME is shown as the worker name in use; the source says where the suffix comes from.
        rows = [
            (
                key,
                value,
                f"{source}, + -{settings.instance} as SOURCE_ADDRESS is set" if key == "HOSTNAME" else source,
            )
            for key, value, source in rows
        ]
    return rows
