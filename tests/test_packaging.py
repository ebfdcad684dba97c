"""The wheel installs under one unique import name and lives beside a distribution that owns ``proto``.

``proto`` is proto-plus's import name (a dependency of every Google Cloud client library); trio-tunnel's folders
are ``tunnel/`` and ``proto/`` but install as ``trio_tunnel`` and ``trio_tunnel.proto``. This builds the real wheel
(no network: ``--no-build-isolation --no-index``), installs it into a fresh virtual environment beside a package
named ``proto``, and imports both.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *offline, "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (built,) = out.glob("trio_tunnel-*.whl")
    return built


def test_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"trio_tunnel"}
    assert "trio_tunnel/proto/frames.py" in names and "trio_tunnel/proto/py.typed" in names
    assert "trio_tunnel/py.typed" in names and "trio_tunnel/__main__.py" in names
    assert "trio_tunnel/dashboard.html" in names  # the --metrics dashboard (package data, not a module)
    # Every module of the source tree is in the wheel (pyproject lists the packages by hand).
    sources = {"trio_tunnel/" + str(p.relative_to(ROOT / "tunnel")) for p in (ROOT / "tunnel").rglob("*.py")}
    assert sources and sources <= set(names), sorted(sources - set(names))
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and "Classifier: Typing :: Typed" in metadata


def test_installs_beside_a_package_named_proto(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    (site / "proto").mkdir()
    (site / "proto" / "__init__.py").write_text("OWNER = 'someone else'\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=120
    )
    # trio, msgpack and attrs come from this interpreter's site-packages (a PYTHONPATH entry: no .pth is run there,
    # so this checkout's editable install stays out of the way).
    deps = sysconfig.get_path("purelib")
    code = (
        "import proto, trio_tunnel.proto, trio_tunnel.cli;"
        "assert proto.OWNER == 'someone else';"
        f"assert trio_tunnel.proto.__file__.startswith({str(site)!r}), trio_tunnel.proto.__file__;"
        "print(trio_tunnel.proto.Connection.__name__)"
    )
    run = dict(capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PYTHONPATH": deps})
    assert subprocess.run([python, "-c", code], check=True, **run).stdout.strip() == "Connection"  # type: ignore[call-overload]
    version = subprocess.run([python, "-m", "trio_tunnel", "--version"], check=True, **run).stdout  # type: ignore[call-overload]
    assert version.startswith("trio-tunnel ")
