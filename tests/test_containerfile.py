"""The Containerfile (not built here: CI has no container engine) copies only files that exist, keeps the build
context small, and runs the console script pyproject declares as an unprivileged user with the state volume the
server's key needs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_copies_only_what_exists_and_builds_the_wheel() -> None:
    instructions = _instructions()
    sources = [
        part for word, rest in instructions if word == "COPY" and "--from" not in rest for part in rest.split()[:-1]
    ]
    assert sources == ["pyproject.toml", "README.md", "LICENSE", "tunnel", "proto"]
    for source in sources:
        assert (ROOT / source).exists(), source
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip wheel" in runs and "--only-binary=:all:" in runs


def test_runs_the_console_script_unprivileged_with_a_state_volume() -> None:
    instructions = dict(_instructions())  # the last of each kind
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert instructions["ENTRYPOINT"] == '["trio-tunnel"]' and "trio-tunnel" in scripts
    assert instructions["USER"] == "trio-tunnel"
    assert "STATE_DIRECTORY=/var/lib/trio-tunnel" in instructions["ENV"]
    assert instructions["VOLUME"] == '["/var/lib/trio-tunnel"]'
    assert instructions["EXPOSE"] == "7835"


def test_the_build_context_leaves_out_the_virtualenv_and_history() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "tests"} <= ignored
