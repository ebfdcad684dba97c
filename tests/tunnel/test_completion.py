"""``trio-tunnel completion bash|zsh``: scripts made from the argument parser, checked in a real bash (and zsh where
installed); ``python -m trio_tunnel`` is the console script."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trio_tunnel.completion import SHELLS, script
from trio_tunnel.usage import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRIO_TUNNEL_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "trio_tunnel", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


def _every_option(parser: argparse.ArgumentParser) -> set[str]:
    names = {name for action in parser._actions for name in action.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= _every_option(sub)
    return names


@pytest.mark.parametrize("shell", SHELLS)
def test_the_command_prints_the_script_with_every_option(shell: str) -> None:
    result = _run("completion", shell)
    assert result.returncode == 0, result.stderr
    assert result.stdout == script(shell, build_parser())
    for option in _every_option(build_parser()):
        assert option in result.stdout, option
    for command in ("server", "client", "map", "demo", "completion"):
        assert command in result.stdout


def test_an_unknown_shell_is_a_usage_error() -> None:
    result = _run("completion", "fish")
    assert result.returncode == 2
    assert "invalid choice: 'fish'" in result.stderr


def test_python_dash_m_is_the_console_script() -> None:
    console = Path(sys.executable).with_name("trio-tunnel")
    if not console.exists():
        pytest.skip(f"no console script next to {sys.executable}")
    for args in (["--version"], ["client", "--help"]):
        by_module = _run(*args)
        by_script = subprocess.run([str(console), *args], capture_output=True, text=True, timeout=30)
        assert by_module.returncode == by_script.returncode == 0
        assert by_module.stdout == by_script.stdout


def _complete_bash(tmp_path: Path, *words: str) -> list[str]:
    """COMPREPLY of the generated function for the command line ``words`` (the last one being completed)."""
    path = tmp_path / "trio-tunnel.bash"
    path.write_text(script("bash", build_parser()))
    array = " ".join(f"'{word}'" for word in words)
    program = f"source {path}; COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; _trio_tunnel 2>/dev/null; "
    program += 'printf "%s\\n" "${COMPREPLY[@]}"'
    result = subprocess.run(["bash", "--norc", "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("trio-tunnel", "cl"), ["client"]),
        (("trio-tunnel", "co"), ["completion"]),
        (("trio-tunnel", "server", "--allow-"), ["--allow-ports", "--allow-target", "--allow-bind"]),
        (("trio-tunnel", "-v", "client", "--exit"), ["--exit-on-refusal"]),
        (("trio-tunnel", "client", "--log-format", ""), ["text", "json"]),
        (("trio-tunnel", "completion", ""), ["-h", "--help", "bash", "zsh"]),
        (("trio-tunnel", "client", "--server", ""), []),
        (("trio-tunnel", "server", "--config", "se"), ["server.toml"]),
        (("trio-tunnel", "server", "--state-dir", ""), ["state"]),
    ],
)
def test_bash_completes(tmp_path: Path, words: tuple[str, ...], expected: list[str]) -> None:
    (tmp_path / "server.toml").write_text("")
    (tmp_path / "state").mkdir()
    assert _complete_bash(tmp_path, *words) == expected


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (the script's text is checked above)")
def test_zsh_loads_the_script(tmp_path: Path) -> None:
    path = tmp_path / "_trio-tunnel"
    path.write_text(script("zsh", build_parser()))
    program = (
        f"autoload -U compinit && compinit -u -d {tmp_path}/zcompdump && source {path} && print $_comps[trio-tunnel]"
    )
    result = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "_trio_tunnel"
    assert result.stderr == ""
