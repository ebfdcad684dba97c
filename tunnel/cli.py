"""The ``trio-tunnel`` command: ``server``, ``client``, ``map`` and ``demo``.

This is the only module that reads the environment (``TRIO_TUNNEL_TOKEN``) and configures logging.

Exit codes: 0 clean shutdown (including after SIGINT/SIGTERM and a drain), 1 runtime failure (one readable line on
stderr; the traceback only with ``-vv``), 2 usage or configuration error (one line ``trio-tunnel: error: ...``).
A second SIGINT/SIGTERM stops at once without draining (exit 1), as does a run function that overruns its drain
timeout by more than a few seconds. Ctrl+C before the signal handler is installed exits 130, quietly.

Token precedence: ``--token``/``--token-file`` (together), else ``TRIO_TUNNEL_TOKEN`` (comma-separated), else the
config file's ``tokens``/``token``/``token_file``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Final, NoReturn, Protocol, cast

import attrs
import trio
from trio_tunnel import __version__
from trio_tunnel.certs import default_state_dir, fingerprint_of_pem_file
from trio_tunnel.client import run_client
from trio_tunnel.config import (
    ClientConfig,
    LocalSpec,
    MapConfig,
    PortSet,
    RemoteSpec,
    ServerConfig,
    TargetAllowlist,
    Timeouts,
    parse_hostport,
    parse_token,
    parse_token_list,
    read_token_file,
)
from trio_tunnel.demo import run_demo
from trio_tunnel.errors import ConfigError, HandshakeError, NameTakenError, TunnelError
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.link import ServerTls
from trio_tunnel.logsetup import LogFormat, configure_logging
from trio_tunnel.mapper import run_map
from trio_tunnel.server import run_server

__all__ = ["build_parser", "main", "run_cli"]

logger = logging.getLogger(__name__)

PROG: Final = "trio-tunnel"
TOKEN_ENV: Final = "TRIO_TUNNEL_TOKEN"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
DRAIN_GRACE: Final = 5.0
"""Seconds a run function may overrun its drain timeout before the CLI cancels it."""


class Start(Protocol):
    """A command's run function with its config bound: runs until shutdown, reports through the task status."""

    def __call__(self, shutdown: Shutdown, /, *, task_status: trio.TaskStatus[Any]) -> Awaitable[object]: ...


_DESCRIPTION = """\
Expose services behind NAT through a public server over one multiplexed TCP link (like ssh -R, frp or rathole),
forward local ports to targets reachable from the server (like ssh -L), or relay one port to another (map).

stdout carries one lifecycle line per event (listening, connected, exposed, forwarding, disconnected);
logs go to stderr."""

_MAIN_EPILOG = """\
examples:
  trio-tunnel demo                    # server, client and a web service on loopback; fetches a page through them
  trio-tunnel server --token-file /etc/trio-tunnel/tokens --allow-ports 9000-9010
  trio-tunnel client --server tunnel.example.com:7835 --token-file ~/.tunnel-token -R web=9000:127.0.0.1:80
  trio-tunnel map 0.0.0.0:10022 192.168.0.10:22

Run 'trio-tunnel COMMAND --help' for the options of a command.
exit codes: 0 clean shutdown, 1 runtime failure, 2 usage or configuration error."""

_SERVER_EPILOG = f"""\
examples:
  # make a token once; keep it out of the process list (--token is visible in ps)
  python3 -c "import secrets; print(secrets.token_urlsafe(32))" > tokens && chmod 600 tokens
  trio-tunnel server --listen 0.0.0.0:7835 --token-file tokens --allow-ports 9000-9010

  # the same token from the environment; several tokens (comma-separated) allow rotation
  {TOKEN_ENV}=... trio-tunnel server

  # let -L clients reach SSH on 10.0.0.0/8 and one database by name
  trio-tunnel server --token-file tokens --allow-target 10.0.0.0/8:22,db.internal:5432

  # everything from a file ([server] table); flags override it
  trio-tunnel server --config /etc/trio-tunnel/tunnel.toml

stdout: 'listening HOST:PORT' once the server accepts clients."""

_CLIENT_EPILOG = f"""\
examples:
  # expose local web, SSH and MySQL on the server's ports 9000, 9001, 9002
  trio-tunnel client --server tunnel.example.com:7835 --token-file token \\
      -R web=9000:127.0.0.1:80 -R ssh=9001:127.0.0.1:22 -R mysql=9002:127.0.0.1:3306

  # let the server pick a free port (see the 'exposed NAME HOST:PORT' line)
  {TOKEN_ENV}=... trio-tunnel client --server tunnel.example.com:7835 -R 0:localhost:8080

  # reach db.internal:5432 (seen from the server) at 127.0.0.1:15432 here
  trio-tunnel client --server tunnel.example.com:7835 --token-file token -L db=15432:db.internal:5432

  # services from a file ([client] table); -R/-L add to them, other flags override it
  trio-tunnel client --config ~/.config/trio-tunnel.toml

spec syntax (-R and -L): [NAME=][bind_address:]port:host:hostport; IPv6 in brackets, e.g. [::1]:8080.
stdout: 'connected HOST:PORT', 'exposed NAME HOST:PORT', 'forwarding NAME HOST:PORT', 'disconnected REASON'."""

_MAP_EPILOG = """\
examples:
  # B relays A's connections to C: on B, map port 10022 to SSH on 192.168.0.10
  trio-tunnel map 0.0.0.0:10022 192.168.0.10:22

  # any free port on loopback (see the 'listening HOST:PORT' line), with a shorter connect timeout
  trio-tunnel map 127.0.0.1:0 example.com:80 --connect-timeout 3 --max-connections 100

stdout: 'listening HOST:PORT' once the listener is bound."""

_DEMO_EPILOG = """\
examples:
  trio-tunnel demo          # keeps running until Ctrl+C, so you can try the printed URL yourself
  trio-tunnel demo --once   # exit after the check (0 when the page came through)"""


# --------------------------------------------------------------------------------------------------------------------
# Argument parsing


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``trio-tunnel server: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_logging_options(parser: argparse.ArgumentParser, *, suffix: str) -> None:
    group = parser.add_argument_group("logging")
    default: Any = 0 if suffix == "global" else argparse.SUPPRESS
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=f"verbose_{suffix}",
        default=default,
        help="more log output: -v debug messages and tracebacks in the log, -vv tracebacks of errors on stderr",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        dest=f"quiet_{suffix}",
        default=default,
        help="less log output: -q warnings and errors, -qq errors only",
    )
    group.add_argument(
        "--log-format",
        choices=("text", "json"),
        dest=f"log_format_{suffix}",
        default=None if suffix == "global" else argparse.SUPPRESS,
        help="log line format on stderr (default: text)",
    )


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "authentication",
        f"Without --token/--token-file, tokens come from env {TOKEN_ENV} (comma-separated), else the config file.",
    )
    group.add_argument(
        "--token",
        action="append",
        metavar="TOKEN",
        help="a shared secret (repeatable; visible in the process list, prefer --token-file or the env)",
    )
    group.add_argument(
        "--token-file",
        action="append",
        metavar="PATH",
        help="file with tokens, one per line, '#' comments (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render ``--help``)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_MAIN_EPILOG, formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_logging_options(parser, suffix="global")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    server = commands.add_parser(
        "server",
        help="accept clients and expose their services on public ports",
        description="Accept tunnel clients and listen on public ports on their behalf.",
        epilog=_SERVER_EPILOG,
        formatter_class=formatter,
    )
    server.add_argument("--listen", metavar="HOST:PORT", help="where clients connect (default 0.0.0.0:7835)")
    _add_token_options(server)
    server.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="run without any token: anyone who reaches the server may use it (not recommended)",
    )
    server.add_argument(
        "--allow-ports",
        metavar="SPEC",
        help="ports clients may expose, e.g. 8000-8999,2222 (default 1024-65535)",
    )
    server.add_argument(
        "--allow-target",
        action="append",
        metavar="SPEC",
        help="where -L clients may reach, e.g. 10.0.0.0/8:22,db.internal:5432,127.0.0.1:* "
        "(repeatable; default: nowhere)",
    )
    tls = server.add_argument_group("TLS on the link (on by default)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="a certificate (PEM, chain allowed) instead of the self-signed one",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="the unencrypted private key (PEM) of --tls-cert")
    tls.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the server's own key and certificate are made and kept "
        "(default $XDG_STATE_HOME/trio-tunnel, /var/lib/trio-tunnel for root)",
    )
    tls.add_argument(
        "--print-fingerprint",
        action="store_true",
        help="print the fingerprint clients pin (sha256:...), making the key if needed, and exit",
    )
    tls.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="no TLS: everything crosses the network readable and changeable (clients must say so too)",
    )
    server.add_argument("--config", metavar="FILE", help="TOML file with a [server] table; flags override it")
    _add_logging_options(server, suffix="command")

    client = commands.add_parser(
        "client",
        help="connect to a server and expose local services (-R) or forward local ports (-L)",
        description="Connect to a trio-tunnel server, keep the link up, and carry -R/-L connections over it.",
        epilog=_CLIENT_EPILOG,
        formatter_class=formatter,
    )
    client.add_argument("--server", metavar="HOST:PORT", help="the server to connect to")
    _add_token_options(client)
    client.add_argument("--name", metavar="NAME", help="this client's identity (default: the host name)")
    client.add_argument(
        "-R",
        action="append",
        default=[],
        dest="remotes",
        metavar="SPEC",
        help="expose a local service on the server: [NAME=][bind_address:]port:host:hostport (repeatable)",
    )
    client.add_argument(
        "-L",
        action="append",
        default=[],
        dest="locals",
        metavar="SPEC",
        help="forward a local port to a target the server dials: [NAME=][bind_address:]port:host:hostport (repeatable)",
    )
    tls = client.add_argument_group("TLS on the link (on by default)")
    tls.add_argument(
        "--server-fingerprint",
        action="append",
        metavar="sha256:...",
        help="the server's key as 'trio-tunnel server' prints it (repeatable, for key rotation); "
        "without it the certificate chain and host name are verified",
    )
    tls.add_argument("--tls-ca", metavar="FILE", help="CA certificates (PEM) to verify the server with")
    tls.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="no TLS: everything crosses the network readable and changeable (the server must say so too)",
    )
    client.add_argument("--config", metavar="FILE", help="TOML file with a [client] table; flags override it")
    _add_logging_options(client, suffix="command")

    mapper = commands.add_parser(
        "map",
        help="relay a local port to a target (a plain TCP port mapper, no server)",
        description="Listen on LISTEN and relay every connection to TARGET, with half-close and reset propagation.",
        epilog=_MAP_EPILOG,
        formatter_class=formatter,
    )
    mapper.add_argument("listen", nargs="?", metavar="LISTEN", help="HOST:PORT to listen on (PORT alone: 0.0.0.0)")
    mapper.add_argument("target", nargs="?", metavar="TARGET", help="HOST:PORT to relay to")
    mapper.add_argument(
        "--connect-timeout", type=float, metavar="SECONDS", help="time allowed to reach TARGET (default 10)"
    )
    mapper.add_argument(
        "--max-connections", type=int, metavar="N", help="concurrent relayed connections (default 1024)"
    )
    mapper.add_argument("--config", metavar="FILE", help="TOML file with a [map] table; arguments override it")
    _add_logging_options(mapper, suffix="command")

    demo = commands.add_parser(
        "demo",
        help="run a server, a client and a web service on loopback and fetch a page through the tunnel",
        description="Everything on loopback in one process: shows a tunnel working in a few seconds.",
        epilog=_DEMO_EPILOG,
        formatter_class=formatter,
    )
    demo.add_argument("--once", action="store_true", help="exit after the check instead of running until Ctrl+C")
    _add_logging_options(demo, suffix="command")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# From arguments to a config


@attrs.frozen
class _Plan:
    """What to run: ``start(shutdown, task_status)``, the command's run function with its config bound."""

    command: str
    start: Start
    drain_timeout: float
    config: ServerConfig | ClientConfig | MapConfig | None = None


def _flag(flag: str, parser: Callable[[Any], Any], text: str | Sequence[str]) -> Any:
    try:
        return parser(text)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _tokens_from(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[bytes, ...] | None:
    tokens: list[bytes] = []
    if args.token:
        logger.warning(
            "--token is visible to other local users in the process list; prefer --token-file or %s", TOKEN_ENV
        )
        tokens.extend(parse_token(text, source="--token") for text in args.token)
    for path in args.token_file or ():
        tokens.extend(read_token_file(os.path.expanduser(path)))
    if tokens:
        return tuple(tokens)
    env = environ.get(TOKEN_ENV, "")
    if env.strip():
        return parse_token_list(env, source=TOKEN_ENV)
    return None


def _split_commas(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [item for value in values for item in value.split(",")]


def _plan(args: argparse.Namespace, environ: Mapping[str, str]) -> _Plan:
    command: str = args.command
    if command == "server":
        targets = _split_commas(args.allow_target)
        server = ServerConfig.from_sources(
            config_file=args.config,
            listen=None
            if args.listen is None
            else _flag("--listen", lambda t: parse_hostport(t, default_host="0.0.0.0"), args.listen),
            tokens=_tokens_from(args, environ),
            insecure_no_auth=args.insecure_no_auth,
            allow_ports=None if args.allow_ports is None else _flag("--allow-ports", PortSet.parse, args.allow_ports),
            allow_targets=None if targets is None else _flag("--allow-target", TargetAllowlist.parse, targets),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            state_dir=args.state_dir,
            insecure_plaintext=args.insecure_plaintext,
        )
        if not server.tokens:
            logger.warning(
                "authentication is disabled (--insecure-no-auth): anyone who can reach %s can expose ports%s",
                server.listen,
                " and reach the allowed targets" if server.allow_targets else "",
            )
        return _Plan(command, partial(run_server, server), server.timeouts.drain, server)
    if command == "client":
        client = ClientConfig.from_sources(
            config_file=args.config,
            server=None
            if args.server is None
            else _flag("--server", lambda t: parse_hostport(t, allow_zero=False), args.server),
            tokens=_tokens_from(args, environ),
            name=args.name,
            remotes=[RemoteSpec.parse(text) for text in args.remotes],
            locals=[LocalSpec.parse(text) for text in args.locals],
            server_fingerprint=_split_commas(args.server_fingerprint),
            tls_ca=args.tls_ca,
            insecure_plaintext=args.insecure_plaintext,
        )
        return _Plan(command, partial(run_client, client), client.timeouts.drain, client)
    if command == "map":
        if args.config is None and (args.listen is None or args.target is None):
            raise ConfigError("map needs LISTEN and TARGET, e.g. trio-tunnel map 0.0.0.0:10022 192.168.0.10:22")
        if args.connect_timeout is not None and not 0 < args.connect_timeout < float("inf"):
            raise ConfigError(f"--connect-timeout: expected seconds > 0, got {args.connect_timeout}")
        if args.max_connections is not None and args.max_connections < 1:
            raise ConfigError(f"--max-connections: expected a count >= 1, got {args.max_connections}")
        mapping = MapConfig.from_sources(
            config_file=args.config,
            listen=None
            if args.listen is None
            else _flag("LISTEN", lambda t: parse_hostport(t, default_host="0.0.0.0"), args.listen),
            target=None
            if args.target is None
            else _flag("TARGET", lambda t: parse_hostport(t, allow_zero=False), args.target),
            connect_timeout=args.connect_timeout,
            max_connections=args.max_connections,
        )
        return _Plan(command, partial(run_map, mapping), mapping.drain_timeout, mapping)
    if command == "demo":
        return _Plan(command, partial(_start_demo, bool(args.once)), Timeouts().drain)
    raise AssertionError(f"unhandled command {command!r}")


async def _start_demo(once: bool, shutdown: Shutdown, *, task_status: trio.TaskStatus[Any]) -> None:
    """The demo reports nothing through a task status: it has started as soon as it runs."""
    task_status.started(None)
    await run_demo(once, shutdown)


# --------------------------------------------------------------------------------------------------------------------
# Running


@attrs.define
class _RunState:
    finished: bool = False
    forced: str | None = None
    started: object = None


async def _watch_signals(
    shutdown: Shutdown,
    cancel_scope: trio.CancelScope,
    state: _RunState,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """First SIGINT/SIGTERM: graceful shutdown (bounded). Second: stop at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.requested.is_set():
                logger.info(
                    "%s received: shutting down (draining for at most %g s; send it again to stop at once)",
                    name,
                    shutdown.drain_timeout,
                )
                shutdown.request()
                cancel_scope.deadline = min(
                    cancel_scope.deadline, trio.current_time() + shutdown.drain_timeout + DRAIN_GRACE
                )
            else:
                logger.warning("%s received again: stopping at once", name)
                state.forced = f"stopped at once on a second {name}, without draining"
                cancel_scope.cancel()


async def _supervise(
    start: Start,
    shutdown: Shutdown,
    cancel_scope: trio.CancelScope,
    state: _RunState,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
) -> None:
    await start(shutdown, task_status=task_status)
    state.finished = True
    cancel_scope.cancel()


async def _amain(start: Start, drain_timeout: float) -> int:
    shutdown = Shutdown(drain_timeout=drain_timeout)
    state = _RunState()
    async with trio.open_nursery() as nursery:
        await nursery.start(_watch_signals, shutdown, nursery.cancel_scope, state)
        state.started = await nursery.start(_supervise, start, shutdown, nursery.cancel_scope, state)
        logger.debug("started: %r", state.started)
    if state.finished:
        return EXIT_OK
    reason = state.forced or f"did not finish draining within {drain_timeout + DRAIN_GRACE:g} s; stopped"
    _error(reason)
    return EXIT_FAILURE


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


_LISTEN_ERRORS: Final = {
    errno.EADDRINUSE: "address already in use (another trio-tunnel or service is running there; pick another {hint})",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE; pick another {hint})",
    errno.EADDRNOTAVAIL: "address not available (it is not an address of this machine; use 0.0.0.0 or one of "
    "its own addresses in {hint})",
}


def _listen_address(plan: _Plan) -> tuple[str | None, str]:
    """The address the command listens on (if there is just one) and the option that sets it."""
    config = plan.config
    if isinstance(config, ServerConfig):
        return str(config.listen), "--listen"
    if isinstance(config, MapConfig):
        return str(config.listen), "LISTEN"
    if isinstance(config, ClientConfig):
        bound = [spec.bind for spec in config.locals if spec.bind_port]
        return (str(bound[0]) if len(bound) == 1 else None), "-L port"
    return None, "port"


def _describe_failure(exc: BaseException, plan: _Plan) -> tuple[str, int]:
    """One readable line and the exit code for an exception that ended a run."""
    if isinstance(exc, ConfigError):
        return str(exc), EXIT_USAGE
    if isinstance(exc, socket.gaierror):
        address, _hint = _listen_address(plan)
        if address is not None and isinstance(plan.config, ServerConfig | MapConfig):
            return f"cannot listen on {address}: cannot resolve the host name ({exc.strerror or exc})", EXIT_FAILURE
        return f"cannot resolve a host name: {exc.strerror or exc}", EXIT_FAILURE
    if isinstance(exc, OSError):
        template = _LISTEN_ERRORS.get(exc.errno or 0)
        if template is not None:
            address, hint = _listen_address(plan)
            where = f"cannot listen on {address}" if address else "cannot listen"
            return f"{where}: {template.format(hint=hint)}", EXIT_FAILURE
        return f"{exc.strerror or exc}", EXIT_FAILURE
    if isinstance(exc, NameTakenError):
        return f"stopped: {exc.reason}", EXIT_FAILURE
    if isinstance(exc, HandshakeError):
        return f"the server refused the session: {exc}", EXIT_FAILURE
    if isinstance(exc, TunnelError):
        return str(exc), EXIT_FAILURE
    return f"unexpected {type(exc).__name__}: {exc} (run with -v for a traceback)", EXIT_FAILURE


def _pick(exc: BaseException) -> BaseException:
    """The most telling leaf of a (possibly grouped) exception."""
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, trio.Cancelled)] or [exc]
    for kind in (ConfigError, OSError, TunnelError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def _print_fingerprint(args: argparse.Namespace) -> int:
    """``server --print-fingerprint``: the pin of --tls-cert, or of the server's own key (made if missing)."""
    try:
        if args.tls_cert is not None:
            value = fingerprint_of_pem_file(args.tls_cert)
        else:
            value = ServerTls.from_state_dir(args.state_dir or default_state_dir()).fingerprint
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except OSError as exc:
        _error(f"cannot make or read the server's key: {exc.strerror or exc}")
        return EXIT_FAILURE
    sys.stdout.write(value + "\n")
    sys.stdout.flush()
    return 0


def run_cli(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Parse ``argv``, run the command, and return the exit code (never raises, except SystemExit)."""
    try:
        return _run_cli(argv, os.environ if environ is None else environ)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _run_cli(argv: Sequence[str] | None, environ: Mapping[str, str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    verbosity = (
        args.verbose_global
        + getattr(args, "verbose_command", 0)
        - args.quiet_global
        - getattr(args, "quiet_command", 0)
    )
    log_format = cast(LogFormat, getattr(args, "log_format_command", None) or args.log_format_global or "text")
    configure_logging(verbosity, log_format)
    if getattr(args, "print_fingerprint", False):
        return _print_fingerprint(args)
    try:
        plan = _plan(args, environ)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        return trio.run(_amain, plan.start, plan.drain_timeout)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        leaf = _pick(exc)
        if isinstance(leaf, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        message, code = _describe_failure(leaf, plan)
        if verbosity >= 2:
            traceback.print_exception(exc)
        else:
            logger.debug("%s failed", plan.command, exc_info=exc)
        _error(message)
        return code


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: ``trio-tunnel``."""
    sys.exit(run_cli(argv))


if __name__ == "__main__":
    # ``python -m trio_tunnel``: run the importable module, so loggers are named "trio_tunnel.cli", not "__main__".
    from trio_tunnel.cli import main as _main

    _main()
