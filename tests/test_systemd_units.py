"""contrib/systemd: the two unit files say what README's "Running it as a service" promises, their command lines are
valid trio-tunnel command lines, and ``systemd-analyze verify`` accepts them where it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trio_tunnel.usage import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SERVER = UNITS / "trio-tunnel-server.service"
CLIENT = UNITS / "trio-tunnel-client@.service"
INSTALLED = "/usr/local/bin/trio-tunnel"


def _settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (all sections; comments and blank lines skipped)."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith(("#", ";", "[")) or not line.strip():
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize("unit", [SERVER, CLIENT], ids=["server", "client"])
def test_sandboxed_notify_units(unit: Path) -> None:
    settings = _settings(unit)
    for key, value in {
        "Type": "notify",
        "DynamicUser": "yes",
        "Restart": "on-failure",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "ExecReload": "/bin/kill -HUP $MAINPID",  # both re-read their files on SIGHUP
    }.items():
        assert settings.get(key) == [value], (unit.name, key)


def test_the_server_keeps_its_key_in_the_state_directory_and_reloads_on_sighup() -> None:
    settings = _settings(SERVER)
    assert settings["StateDirectory"] == ["trio-tunnel"]
    assert "--state-dir" not in settings["ExecStart"][0]  # the server finds $STATE_DIRECTORY itself


@pytest.mark.parametrize("unit", [SERVER, CLIENT], ids=["server", "client"])
def test_the_command_line_is_valid(unit: Path) -> None:
    (command,) = _settings(unit)["ExecStart"]
    argv = command.split()
    assert argv[0] == INSTALLED
    argv = [re.sub(r"\$\{[A-Z_]+\}|%i", "x", arg) for arg in argv[1:]]
    args = build_parser().parse_args(argv)
    assert args.command == ("server" if unit is SERVER else "client")
    assert args.config and args.token_file


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart= exists: point it at this environment's trio-tunnel.
    console = Path(sys.executable).with_name("trio-tunnel")
    if not console.exists():
        pytest.skip(f"no trio-tunnel console script next to {sys.executable}")
    copies = []
    for unit, name in ((SERVER, SERVER.name), (CLIENT, "trio-tunnel-client@home.service")):
        copy = tmp_path / name
        copy.write_text(unit.read_text().replace(INSTALLED, str(console)))
        copies.append(str(copy))
    result = subprocess.run(
        ["systemd-analyze", "verify", *copies], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    # Unknown keys and unparsable values are only warnings (exit 0): any line about our files is a failure.
    ours = [line for line in result.stderr.splitlines() if "trio-tunnel" in line]
    assert result.returncode == 0, result.stderr
    assert not ours, result.stderr
