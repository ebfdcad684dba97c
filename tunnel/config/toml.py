"""Reading TOML config files: one table at a time, with errors that name the file, the key and the fix."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from trio_tunnel.errors import ConfigError

from .addresses import HostPort, parse_hostport
from .tokens import _T, _dedupe, parse_token, read_token_file

_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


# --------------------------------------------------------------------------------------------------------------------
# TOML reading


def _key_path(path: str, key: str) -> str:
    part = key if _BARE_KEY_RE.fullmatch(key) else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{path}.{part}" if path else part


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} value"


@attrs.frozen
class _Section:
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

    def sub(self, key: str) -> _Section | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table ([{_key_path(self.path, key)}]), got {_describe(value)}")
        return _Section(value, _key_path(self.path, key), self.file, self.base_dir)

    def string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is None or isinstance(value, str):
            return value
        raise self.error(key, f"expected a string, got {_describe(value)}")

    def boolean(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None or isinstance(value, bool):
            return value
        raise self.error(key, f"expected true or false, got {_describe(value)}")

    def integer(self, key: str, *, low: int, high: int | None, what: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        expected = f"expected an integer {what} {low}-{high}" if high else f"expected an integer {what} >= {low}"
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
            raise self.error(key, f"{expected}, got {value!r} (a string: remove the quotes)")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"{expected}, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            raise self.error(key, f"{expected}, got {value}")
        return value

    def seconds(self, key: str) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
            raise self.error(key, f"expected a number of seconds > 0, got {_describe(value)}")
        return float(value)

    def strings(self, key: str) -> list[str] | None:
        """A string or a list of strings."""
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise self.error(key, f"expected a string or a list of strings, got {_describe(value)}")

    def hostport(self, key: str, *, default_host: str, allow_zero: bool) -> HostPort | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.error(key, f'expected "HOST:PORT", got {_describe(value)}')
        return self.parsed(key, parse_hostport, value, default_host=default_host, allow_zero=allow_zero)

    def parsed(self, key: str, parser: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            return parser(*args, **kwargs)
        except ConfigError as exc:
            raise self.error(key, str(exc)) from None

    def tokens(self) -> tuple[bytes, ...] | None:
        found: list[bytes] = []
        token_list = self.data.get("tokens")
        if token_list is not None and not (
            isinstance(token_list, list) and all(isinstance(item, str) for item in token_list)
        ):
            raise self.error("tokens", f"expected a list of strings, got {_describe(token_list)}")
        for index, text in enumerate(token_list or ()):
            found.append(self.parsed("tokens", parse_token, text, source=f"{self.file}: {self.path}.tokens[{index}]"))
        token = self.string("token")
        if token is not None:
            found.append(self.parsed("token", parse_token, token, source=f"{self.file}: {self.path}.token"))
        token_file = self.string("token_file")
        if token_file is not None:
            found.extend(self.parsed("token_file", read_token_file, self.base_dir / Path(token_file).expanduser()))
        return _dedupe(found) if token_list is not None or token is not None or token_file is not None else None


def _load_section(path: str | os.PathLike[str], table: str) -> _Section:
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
    top = _Section(data, "", file, Path(path).parent)
    for key in data:
        if key not in ("server", "client", "map"):
            close = difflib.get_close_matches(key, ("server", "client", "map"), n=1, cutoff=0.6)
            hint = f"did you mean [{close[0]}]?" if close else "valid tables: [server], [client], [map]"
            raise ConfigError(f"{file}: {_key_path('', key)}: unknown table; {hint}")
    section = top.sub(table)
    if section is None:
        raise ConfigError(f"{file}: no [{table}] table in this file")
    return section
