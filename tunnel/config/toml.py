"""Reading TOML config files: one table at a time, with errors that name the file, the key and the fix.

Nothing here knows a key by name: :func:`read_fields` walks the attrs fields of a config class and reads those that
carry a :class:`~.fields.Key` in their metadata, and the "unknown key" check accepts exactly those keys.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from trio_tunnel.errors import ConfigError

from .fields import Key, build, dedupe, describe, keys_of
from .tokens import parse_token, read_token_file

__all__ = ["Section", "key_paths", "load_section", "path_reader", "read_fields", "read_tokens"]

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def _key_path(path: str, key: str) -> str:
    part = key if _BARE_KEY_RE.fullmatch(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{path}.{part}" if path else part


@attrs.frozen
class Section:
    """One TOML table being read, with what is needed to report errors precisely."""

    data: Mapping[str, Any]
    path: str
    file: str
    base_dir: Path

    def error(self, key: str | None, message: str) -> ConfigError:
        where = _key_path(self.path, key) if key is not None else self.path
        return ConfigError(f"{self.file}: {where}: {message}")

    def check_keys(self, allowed: Sequence[str]) -> None:
        for key in self.data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(allowed)}"
                raise self.error(key, f"unknown key; {hint}")

    def sub(self, key: str) -> Section | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table ([{_key_path(self.path, key)}]), got {describe(value)}")
        return Section(value, _key_path(self.path, key), self.file, self.base_dir)

    def value(self, key: str, key_spec: Key) -> Any:
        """The value of ``key`` as ``key_spec`` reads it (None when absent); a bad value names the key."""
        value = self.data.get(key)
        if value is None:
            return None
        try:
            if key_spec.rule is not None:
                return key_spec.rule.from_file(value)
            assert key_spec.parse is not None
            return key_spec.parse(value)
        except (ValueError, ConfigError) as exc:
            raise self.error(key, str(exc)) from None


def read_fields(cls: type, sec: Section) -> dict[str, Any]:
    """The values for ``cls``'s fields that ``sec`` gives (absent keys are left out, so defaults apply)."""
    keys = keys_of(cls)
    sec.check_keys([name for field, key in keys for name in key.names_for(field.name)])
    fields: dict[str, Any] = {}
    for field, key in keys:
        name = key.names_for(field.name)[0]
        if key.read is not None:
            value = key.read(sec)
        elif key.table is not None:
            value = _read_table(key.table, sec.sub(name))
        elif key.entries is not None:
            value = _read_entries(key, sec, name)
        else:
            value = sec.value(name, key)
        if value is None:
            if key.missing is not None:
                raise sec.error(name, f"missing: {key.missing}")
        elif key.spread is not None:
            fields.update(zip(key.spread, (value.host, value.port), strict=True))
        else:
            fields[field.name] = value
    return fields


def _read_table(cls: type, sec: Section | None) -> Any:
    if sec is None:
        return None
    return build(cls, read_fields(cls, sec), source=f"{sec.file}: {sec.path}")


def _read_entries(key: Key, sec: Section, name: str) -> tuple[Any, ...]:
    assert key.entries is not None
    table = sec.sub(name)
    entries: list[Any] = []
    for entry_name in table.data if table else ():
        assert table is not None
        entry = table.sub(entry_name)
        assert entry is not None
        fields = {"name": entry_name, **read_fields(key.entries, entry)}
        entries.append(build(key.entries, fields, source=f"{entry.file}: {entry.path}"))
    if table is not None and key.check is not None:
        try:
            key.check(tuple(entries))
        except ValueError as exc:
            raise ConfigError(f"{table.file}: {table.path}: {exc}") from None
    return tuple(entries)


def read_tokens(sec: Section) -> tuple[bytes, ...] | None:
    """``tokens = [...]``, ``token = "..."`` and ``token_file = "PATH"`` together (None when none is given);
    a relative ``token_file`` is relative to the config file."""
    found: list[bytes] = []
    token_list = sec.data.get("tokens")
    if token_list is not None and not (
        isinstance(token_list, list) and all(isinstance(item, str) for item in token_list)
    ):
        raise sec.error("tokens", f"expected a list of strings, got {describe(token_list)}")
    for index, text in enumerate(token_list or ()):
        try:
            found.append(parse_token(text, source=f"{sec.file}: {sec.path}.tokens[{index}]"))
        except ConfigError as exc:
            raise sec.error("tokens", str(exc)) from None
    token = sec.data.get("token")
    if token is not None:
        if not isinstance(token, str):
            raise sec.error("token", f"expected a string, got {describe(token)}")
        try:
            found.append(parse_token(token, source=f"{sec.file}: {sec.path}.token"))
        except ConfigError as exc:
            raise sec.error("token", str(exc)) from None
    token_file = sec.data.get("token_file")
    if token_file is not None:
        if not isinstance(token_file, str):
            raise sec.error("token_file", f"expected a string, got {describe(token_file)}")
        try:
            found.extend(read_token_file(sec.base_dir / Path(token_file).expanduser()))
        except ConfigError as exc:
            raise sec.error("token_file", str(exc)) from None
    return dedupe(found) if token_list is not None or token is not None or token_file is not None else None


def path_reader(key: str) -> Callable[[Section], str | None]:
    """A :class:`~.fields.Key` ``read`` for a file or directory path: a string, ``~`` expanded, and relative to the
    config file's folder (as ``token_file`` is). The file is not opened here."""

    def read(sec: Section) -> str | None:
        value = sec.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise sec.error(key, f"expected a path (a non-empty string), got {describe(value)}")
        return str(sec.base_dir / Path(value).expanduser())

    return read


def load_section(path: str | os.PathLike[str], table: str, *, tables: Sequence[str]) -> Section:
    """Parse ``path`` and return its ``[table]``; other top-level names must be in ``tables``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not valid UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    file = str(path)
    for key in data:
        if key not in tables:
            close = difflib.get_close_matches(key, tables, n=1, cutoff=0.6)
            hint = f"did you mean [{close[0]}]?" if close else "valid tables: " + ", ".join(f"[{t}]" for t in tables)
            raise ConfigError(f"{file}: {_key_path('', key)}: unknown table; {hint}")
    section = Section(data, "", file, Path(path).parent).sub(table)
    if section is None:
        raise ConfigError(f"{file}: no [{table}] table in this file")
    return section


def key_paths(cls: type, table: str) -> Iterator[tuple[str, str]]:
    """Every (table, key) the loader accepts for ``cls`` read from ``[table]``, sub-tables included; an entry
    table's name is written ``NAME`` (``client.expose.NAME``). For the docs test and the docs themselves."""
    for field, key in keys_of(cls):
        names = key.names_for(field.name)
        for name in names:
            yield table, name
        if key.table is not None:
            yield from key_paths(key.table, f"{table}.{names[0]}")
        if key.entries is not None:
            yield from key_paths(key.entries, f"{table}.{names[0]}.NAME")
