"""The trio-tunnel command line, run as a real subprocess.

Usage and configuration errors go through ``python -m trio_tunnel``. Run-time behaviour (signals, exit codes, error
lines, logging) goes through a small harness that puts fake run functions in place of the ones ``trio_tunnel.cli``
calls (its ``run_server``, ``run_client``, ``run_map``, ``run_demo``) before calling ``trio_tunnel.cli.main``, so it
tests the CLI alone, whatever those functions do.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio_tunnel

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cli-test-token-0123456789"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRIO_TUNNEL_TOKEN", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trio_tunnel.cli", *args],
        cwd=ROOT,
        env=_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0] == lines[-1]
    assert errors[0].startswith("trio-tunnel")
    return errors[0]


# --------------------------------------------------------------------------------------------------------------------
# --version, --help, usage errors


def test_version() -> None:
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"trio-tunnel {trio_tunnel.__version__}" == "trio-tunnel 0.1.0"


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["trio-tunnel demo", "trio-tunnel server", "trio-tunnel client", "trio-tunnel map", "exit codes"]),
        (
            ("server",),
            [
                "--listen HOST:PORT",
                "--token-file",
                "TRIO_TUNNEL_TOKEN",
                "--allow-ports",
                "--allow-target",
                "--insecure-no-auth",
                "--config",
                "token_urlsafe",
                "listening HOST:PORT",
            ],
        ),
        (
            ("client",),
            [
                "--server HOST:PORT",
                "--name",
                "-R SPEC",
                "-L SPEC",
                "-R web=9000:127.0.0.1:80",
                "-R ssh=9001:127.0.0.1:22",
                "-R mysql=9002:127.0.0.1:3306",
                "exposed NAME HOST:PORT",
            ],
        ),
        (
            ("map",),
            [
                "LISTEN",
                "TARGET",
                "--connect-timeout",
                "--max-connections",
                "trio-tunnel map 0.0.0.0:10022 192.168.0.10:22",
            ],
        ),
        (("demo",), ["--once", "trio-tunnel demo --once"]),
    ],
)
def test_help_has_examples(command: tuple[str, ...], expected: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0, result
    assert "examples:" in result.stdout
    for text in expected:
        assert text in result.stdout
    for option in ("-v", "-q", "--log-format {text,json}"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("nope",), "invalid choice: 'nope'"),
        (("server", "--listen"), "argument --listen: expected one argument"),
        (("server", "--bogus"), "unrecognized arguments: --bogus"),
        (("map", "1", "h:2", "--connect-timeout", "soon"), "invalid float value: 'soon'"),
        (("--log-format", "xml", "demo"), "invalid choice: 'xml'"),
    ],
)
def test_usage_errors_are_one_line(args: tuple[str, ...], expected: str) -> None:
    result = cli(*args)
    line = assert_one_error_line(result)
    assert expected in line
    assert result.stdout == ""


def test_server_without_token_refuses_to_start() -> None:
    result = cli("server", "--listen", "127.0.0.1:0")
    line = assert_one_error_line(result)
    assert line.startswith("trio-tunnel: error: the server needs a token")
    for hint in (
        "--token-file",
        "TRIO_TUNNEL_TOKEN",
        'python3 -c "import secrets; print(secrets.token_urlsafe(32))"',
        "--insecure-no-auth",
    ):
        assert hint in line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("client", "--server", "h:7835", "-R", "abc"), "trio-tunnel: error: invalid -R spec 'abc': "),
        (("client", "--server", "h:7835", "-R", "9000:::1:80"), "must be written in brackets"),
        (("client", "--server", "h:7835", "-L", "99999:db:1"), "invalid -L spec '99999:db:1': port 99999"),
        (("client", "--server", "h:7835"), "nothing to do: expose a local service with -R"),
        (("client", "-R", "0:h:1"), "no server address: pass --server HOST:PORT"),
        (("client", "--server", "h:", "-R", "0:h:1"), "--server: invalid address 'h:'"),
        (("server", "--token", TOKEN, "--allow-bind", "0.0.0.0,,::"), "--allow-bind: invalid bind address list"),
        (("server", "--token", TOKEN, "--allow-bind", "a b"), "--allow-bind: invalid bind address 'a b'"),
        (("client", "--server", "h:1", "-R", "0:h:1", "--name", "a/b"), "--name 'a/b'"),
        (("server", "--token", TOKEN, "--allow-ports", "9-1"), "--allow-ports: invalid port set '9-1'"),
        (("server", "--token", TOKEN, "--allow-target", "*:22"), "--allow-target: invalid target rule '*:22'"),
        (("server", "--token", TOKEN, "--listen", "::1:7835"), "--listen: invalid address '::1:7835'"),
        (("server", "--token-file", "/nonexistent/tokens"), "/nonexistent/tokens: token file not found"),
        (("server", "--config", "/nonexistent/x.toml", "--token", TOKEN), "config file not found"),
        (("map", "10022"), "map needs LISTEN and TARGET"),
        (("map", "10022", "h:0"), "TARGET: invalid address 'h:0'"),
        (("map", "10022", "h:1", "--max-connections", "0"), "--max-connections: expected a count >= 1"),
    ],
)
def test_config_errors_exit_2(args: tuple[str, ...], expected: str) -> None:
    line = assert_one_error_line(cli(*args))
    assert expected in line


def test_config_file_error_names_file_key_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text('[client]\nserver = "h:7835"\n[client.expose.web]\nlocal = "127.0.0.1:80"\nremote_prot = 9000\n')
    line = assert_one_error_line(cli("client", "--config", str(path)))
    assert line == (
        f"trio-tunnel: error: {path}: client.expose.web.remote_prot: unknown key; did you mean 'remote_port'?"
    )
    path.write_text("[client]\nserver = \n")
    line = assert_one_error_line(cli("client", "--config", str(path)))
    assert f"{path}: invalid TOML: " in line and "line 2" in line


# --------------------------------------------------------------------------------------------------------------------
# Run-time behaviour, with fake run functions

HARNESS = r"""
import errno, json, logging, os, sys
import trio
from trio_tunnel.console import announce
from trio_tunnel.errors import HandshakeError

logger = logging.getLogger("trio_tunnel.fake")
mode = os.environ["FAKE_MODE"]

def describe(config):
    out = {"type": type(config).__name__}
    for key in ("listen", "target", "server", "name", "allow_ports", "allow_targets"):
        if hasattr(config, key):
            out[key] = str(getattr(config, key))
    if hasattr(config, "tokens"):
        out["tokens"] = [t.decode() for t in config.tokens]
        out["insecure_no_auth"] = config.insecure_no_auth
    if hasattr(config, "token"):
        out["token"] = None if config.token is None else config.token.decode()
        out["remotes"] = [str(r) for r in config.remotes]
        out["locals"] = [str(r) for r in config.locals]
    return out

async def run(config, shutdown, *, reload=None, task_status=trio.TASK_STATUS_IGNORED):
    if mode == "bind":
        listeners = await trio.open_tcp_listeners(config.listen.port, host=config.listen.host)
        task_status.started(None)
        return
    if mode == "crash":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            raise RuntimeError("boom")
    if mode == "refused":
        raise HandshakeError(14, "unknown token")
    task_status.started(("127.0.0.1", 1))
    logger.info("started", extra={"peer": "1.2.3.4:5", "streams": 3})
    announce("ready " + json.dumps(describe(config)) + f" drain={shutdown.drain_timeout:g}")
    if mode == "dump":
        return
    if mode == "stubborn":
        await trio.sleep_forever()
    await shutdown.requested.wait()
    logger.info("draining")
    announce("drained")

async def run_demo(once, shutdown):
    announce(f"demo once={once}")

import trio_tunnel.cli as cli
cli.run_server = cli.run_client = cli.run_map = run
cli.run_demo = run_demo
cli.main(sys.argv[1:])
"""


@pytest.fixture
def harness(tmp_path: Path) -> Path:
    path = tmp_path / "harness.py"
    path.write_text(HARNESS)
    return path


def fake(harness: Path, mode: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(harness), *args],
        cwd=ROOT,
        env=_env(FAKE_MODE=mode, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 15) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no stdout line in time"
    return proc.stdout.readline()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=20)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out, err


def ready_config(line: str) -> dict[str, object]:
    assert line.startswith("ready "), line
    value = json.loads(line[len("ready ") : line.rindex(" drain=")])
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_drains_and_exits_0(harness: Path, procs: list[subprocess.Popen[str]], signum: signal.Signals) -> None:
    proc = fake(harness, "wait", "server", "--insecure-no-auth", "--listen", "127.0.0.1:0")
    procs.append(proc)
    line = read_line(proc)
    assert line.endswith(" drain=10\n")
    proc.send_signal(signum)
    code, out, err = finish(proc)
    assert code == 0, err
    assert out == "drained\n"
    assert f"{signum.name} received: shutting down" in err
    assert "Traceback" not in err


def test_second_signal_stops_at_once(harness: Path, procs: list[subprocess.Popen[str]]) -> None:
    proc = fake(harness, "stubborn", "map", "127.0.0.1:0", "127.0.0.1:9")
    procs.append(proc)
    read_line(proc)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    assert proc.stderr is not None
    seen = ""
    while "shutting down" not in seen and time.monotonic() < deadline:  # the first signal has been handled
        if select.select([proc.stderr], [], [], 0.1)[0]:
            seen += proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    begin = time.monotonic()
    code, _out, err = finish(proc)
    assert time.monotonic() - begin < 5  # at once, not after the 10 s drain timeout
    err = seen + err
    assert code == 1
    assert "SIGINT received again: stopping at once" in err
    assert err.splitlines()[-1] == "trio-tunnel: error: stopped at once on a second SIGINT, without draining"
    assert "Traceback" not in err


def test_overrunning_the_drain_timeout_is_cut_short(
    harness: Path, procs: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    config = tmp_path / "map.toml"
    config.write_text('[map]\nlisten = "127.0.0.1:0"\ntarget = "127.0.0.1:9"\ndrain_timeout = 0.2\n')
    proc = fake(harness, "stubborn", "map", "--config", str(config))
    procs.append(proc)
    assert read_line(proc).endswith(" drain=0.2\n")
    begin = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _out, err = finish(proc)
    assert code == 1
    assert 4 < time.monotonic() - begin < 15
    assert err.splitlines()[-1] == "trio-tunnel: error: did not finish draining within 5.2 s; stopped"


def test_address_in_use_is_one_readable_line(harness: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = fake(harness, "bind", "server", "--insecure-no-auth", "--listen", f"127.0.0.1:{port}")
        code, out, err = finish(proc)
    assert code == 1
    assert err.splitlines()[-1] == (
        f"trio-tunnel: error: cannot listen on 127.0.0.1:{port}: address already in use "
        "(another trio-tunnel or service is running there; pick another --listen)"
    )
    assert "Traceback" not in err and out == ""


def test_address_not_available(harness: Path) -> None:
    proc = fake(harness, "bind", "map", "192.0.2.1:0", "127.0.0.1:9")  # TEST-NET-1: not an address of this host
    code, _out, err = finish(proc)
    assert code == 1
    assert err.splitlines()[-1].startswith("trio-tunnel: error: cannot listen on 192.0.2.1:0: address not available")


def test_unresolvable_listen_host(harness: Path) -> None:
    proc = fake(harness, "bind", "server", "--insecure-no-auth", "--listen", "nosuch.invalid:0")
    code, _out, err = finish(proc)
    assert code == 1
    assert err.splitlines()[-1].startswith(
        "trio-tunnel: error: cannot listen on nosuch.invalid:0: cannot resolve the host name ("
    )


def test_runtime_failure_one_line_and_traceback_only_with_vv(harness: Path) -> None:
    # the run function raises inside a nursery: the CLI digs the error out of the ExceptionGroup
    code, _out, err = finish(fake(harness, "crash", "server", "--insecure-no-auth"))
    assert code == 1
    assert err.splitlines()[-1] == "trio-tunnel: error: unexpected RuntimeError: boom (run with -v for a traceback)"
    assert "Traceback" not in err
    code, _out, err = finish(fake(harness, "crash", "-vv", "server", "--insecure-no-auth"))
    assert code == 1
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.splitlines()[-1].startswith("trio-tunnel: error: unexpected RuntimeError: boom")


def test_handshake_refusal(harness: Path) -> None:
    code, _out, err = finish(fake(harness, "refused", "client", "--server", "h:1", "-R", "0:h:1"))
    assert code == 1
    assert err.splitlines()[-1] == "trio-tunnel: error: the server refused the session: unknown token (AUTH)"


def test_demo_without_task_status(harness: Path) -> None:
    code, out, err = finish(fake(harness, "dump", "demo", "--once"))
    assert (code, out) == (0, "demo once=True\n"), err


def _dump(harness: Path, args: Sequence[str], **env: str) -> tuple[dict[str, object], str]:
    code, out, err = finish(fake(harness, "dump", *args, **env))
    assert code == 0, err
    return ready_config(out.splitlines()[0]), err


def test_flags_reach_the_run_function(harness: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# current\nfile-token-0123456789\nsecond-token-0123456789\n")
    tokens.chmod(0o600)
    config, err = _dump(
        harness,
        [
            "server",
            "--listen",
            "7000",
            "--token-file",
            str(tokens),
            "--allow-ports",
            "9000-9002,2222",
            "--allow-target",
            "10.0.0.0/8:22,db:5432",
            "--allow-target",
            "127.0.0.1:*",
        ],
        TRIO_TUNNEL_TOKEN="env-token-0123456789",  # ignored: flags win
    )
    assert config == {
        "type": "ServerConfig",
        "listen": "0.0.0.0:7000",
        "allow_ports": "2222,9000-9002",
        "allow_targets": "10.0.0.0/8:22,db:5432,127.0.0.1:*",
        "tokens": ["file-token-0123456789", "second-token-0123456789"],
        "insecure_no_auth": False,
    }
    assert "WARNING" not in err

    config, _err = _dump(harness, ["server"], TRIO_TUNNEL_TOKEN="env-token-0123456789,env-token-2-0123456789")
    assert config["tokens"] == ["env-token-0123456789", "env-token-2-0123456789"]

    config, err = _dump(harness, ["server", "--insecure-no-auth"])
    assert config["tokens"] == [] and config["insecure_no_auth"] is True
    assert re.search(r"WARNING trio_tunnel\.cli: authentication is disabled \(--insecure-no-auth\)", err)

    config, err = _dump(harness, ["server", "--token", "shorty"])
    assert "visible to other local users" in err and "only 6 characters long" in err

    config, _err = _dump(
        harness,
        ["client", "--server", "[::1]:7835", "--name", "laptop", "-R", "web=9000:127.0.0.1:80", "-L", "15432:db:5432"],
        TRIO_TUNNEL_TOKEN="env-token-0123456789,second",
    )
    assert config == {
        "type": "ClientConfig",
        "server": "[::1]:7835",
        "name": "laptop",
        "token": "env-token-0123456789",
        "remotes": ["web=0.0.0.0:9000:127.0.0.1:80"],
        "locals": ["db:5432=127.0.0.1:15432:db:5432"],
    }

    config, _err = _dump(harness, ["map", "10022", "192.168.0.10:22", "--connect-timeout", "3"])
    assert config == {"type": "MapConfig", "listen": "0.0.0.0:10022", "target": "192.168.0.10:22"}


def test_config_file_and_flags(harness: Path, tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text(
        '[client]\nserver = "file.example:7835"\ntoken = "file-token-0123456789"\n'
        "[client.expose.web]\nlocal = 80\nremote_port = 9000\n"
        "[client.expose.ssh]\nlocal = 22\nremote_port = 9001\n"
    )
    config, _err = _dump(harness, ["client", "--config", str(path), "-R", "ssh=9005:127.0.0.1:22", "--name", "n1"])
    assert config["server"] == "file.example:7835"
    assert config["token"] == "file-token-0123456789"
    assert config["remotes"] == ["web=0.0.0.0:9000:127.0.0.1:80", "ssh=0.0.0.0:9005:127.0.0.1:22"]
    assert config["name"] == "n1"


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR) [\w.]+: .+$")


def test_log_formats_and_levels(harness: Path) -> None:
    _config, err = _dump(harness, ["server", "--insecure-no-auth"])
    lines = err.splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), lines
    assert any(line.endswith(" INFO trio_tunnel.fake: started") for line in lines)

    _config, err = _dump(harness, ["--log-format", "json", "server", "--insecure-no-auth", "-v"])
    records = [json.loads(line) for line in err.splitlines()]
    started = next(r for r in records if r["msg"] == "started")
    assert started["level"] == "INFO" and started["logger"] == "trio_tunnel.fake"
    assert started["peer"] == "1.2.3.4:5" and started["streams"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", started["ts"])
    assert any(r["level"] == "DEBUG" for r in records)  # -v after the command counts too

    _config, err = _dump(harness, ["-q", "server", "--insecure-no-auth"])
    assert "INFO" not in err and "WARNING trio_tunnel.cli: authentication is disabled" in err
    _config, err = _dump(harness, ["server", "-qq", "--insecure-no-auth"])
    assert err == ""
    _config, err = _dump(harness, ["-q", "server", "-v", "--insecure-no-auth"])  # they add up: back to INFO
    assert "INFO trio_tunnel.fake: started" in err and "DEBUG" not in err


def test_print_fingerprint_reads_the_state_dir_from_the_config_file(tmp_path: Path) -> None:
    """``server --print-fingerprint --config FILE`` pins the key the server started with that file would use (the
    file needs no token for this)."""
    from trio_tunnel.certs import CERT_FILE, fingerprint_of_pem_file

    state = tmp_path / "from-the-file"
    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nstate_dir = "{state}"\n')
    done = cli("server", "--print-fingerprint", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == fingerprint_of_pem_file(state / CERT_FILE)
