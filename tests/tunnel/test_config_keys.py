"""tunnel.config: the TOML keys come from the attrs fields' metadata, and docs/CONFIG.md documents every one."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest
from trio_tunnel.config import ServerConfig
from trio_tunnel.config.commands import TABLES
from trio_tunnel.config.fields import COUNT, SECONDS, toml
from trio_tunnel.config.toml import Section, key_paths, read_fields
from trio_tunnel.errors import ConfigError

CONFIG_DOC = Path(__file__).parents[2] / "docs" / "CONFIG.md"


def _documented() -> dict[str, set[str]]:
    """For each table named in a docs heading (``## `[server.timeouts]` and `[client.timeouts]```), the keys that
    start a row of the reference table below that heading."""
    keys: dict[str, set[str]] = {}
    tables: list[str] = []
    for line in CONFIG_DOC.read_text().splitlines():
        if line.startswith("#"):
            tables = re.findall(r"`\[([A-Za-z0-9_.]+)\]`", line)
            for table in tables:
                keys.setdefault(table, set())
            continue
        row = re.match(r"\| `([A-Za-z0-9_]+)` \|", line)
        if row:
            for table in tables:
                keys[table].add(row.group(1))
    return keys


def _accepted() -> list[tuple[str, str]]:
    return [pair for table, cls in TABLES.items() for pair in key_paths(cls, table)]


def test_every_accepted_key_is_documented() -> None:
    documented = _documented()
    missing = [f"[{table}] {key}" for table, key in _accepted() if key not in documented.get(table, set())]
    assert not missing, f"keys the loader accepts but docs/CONFIG.md does not describe: {missing}"


def test_every_documented_key_is_accepted() -> None:
    accepted = set(_accepted())
    stale = [
        f"[{table}] {key}"
        for table, keys in _documented().items()
        for key in keys
        if table.split(".")[0] in TABLES and (table, key) not in accepted
    ]
    assert not stale, f"docs/CONFIG.md describes keys the loader does not accept: {stale}"


def test_key_paths_cover_sub_tables_and_entries() -> None:
    accepted = _accepted()
    for pair in [
        ("server", "token_file"),
        ("server.timeouts", "reconnect_jitter"),
        ("client", "expose"),
        ("client.expose.NAME", "remote_port"),
        ("client.forward.NAME", "target"),
        ("map", "drain_timeout"),
    ]:
        assert pair in accepted
    assert ("client.expose.NAME", "name") not in accepted  # the name is the table's, not a key


@attrs.frozen(kw_only=True)
class _Example:
    """A config class as a new key is added: one field with metadata, nothing else."""

    retries: int = COUNT.field(default=3, metadata=toml(rule=COUNT))
    grace: float = SECONDS.field(default=1.0, metadata=toml(name="grace_seconds", rule=SECONDS))
    internal: str = "not a key"


def _section(data: dict[str, object]) -> Section:
    return Section(data, "example", "x.toml", Path("."))


def test_a_new_field_is_a_new_key() -> None:
    assert read_fields(_Example, _section({"retries": 5, "grace_seconds": 2})) == {"retries": 5, "grace": 2.0}
    assert list(key_paths(_Example, "example")) == [("example", "retries"), ("example", "grace_seconds")]
    with pytest.raises(ConfigError, match=r"^x.toml: example.internal: unknown key; valid keys: retries, grace_sec"):
        read_fields(_Example, _section({"internal": "x"}))
    with pytest.raises(ConfigError, match=r"^x.toml: example.retries: expected an integer count >= 1, got 0$"):
        read_fields(_Example, _section({"retries": 0}))
    with pytest.raises(ValueError, match=r"^retries must be a positive integer, got 0$"):
        _Example(retries=0)  # the same rule guards plain construction


def test_allow_ports_as_a_bare_number(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\ninsecure_no_auth = true\nallow_ports = 9000\n")
    assert list(ServerConfig.from_toml(path).allow_ports) == [9000]
    path.write_text("[server]\ninsecure_no_auth = true\nallow_ports = [9000, '9100-9101']\n")
    assert list(ServerConfig.from_toml(path).allow_ports) == [9000, 9100, 9101]
