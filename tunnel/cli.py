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
from typing import Any, Final, NoReturn, Protocol, TypeVar, cast

import attrs
import trio
from trio_tunnel import notify
from trio_tunnel.certs import default_state_dir, fingerprint_of_pem_file
from trio_tunnel.client import run_client
from trio_tunnel.completion import script as completion_script
from trio_tunnel.config import (
    DEFAULT_SERVER_PORT,
    BindAllowlist,
    ClientConfig,
    HostPort,
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
    server_identity_files,
)
from trio_tunnel.config.addresses import split_protocol
from trio_tunnel.demo import run_demo
from trio_tunnel.errors import ConfigError, HandshakeError, NameTakenError, TunnelError
from trio_tunnel.lifecycle import Shutdown
from trio_tunnel.link import ServerTls
from trio_tunnel.logsetup import LogFormat, configure_logging
from trio_tunnel.mapper import run_map
from trio_tunnel.memtune import tune_malloc
from trio_tunnel.server import run_server
from trio_tunnel.status import run_status
from trio_tunnel.usage import EXIT_USAGE, PROG, TOKEN_ENV, build_parser
from trio_tunnel.workers import parse_workers, run_workers, worker_count

__all__ = ["build_parser", "main", "run_cli"]

logger = logging.getLogger(__name__)

C = TypeVar("C", ServerConfig, ClientConfig)

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_INTERRUPTED: Final = 130
DRAIN_GRACE: Final = 5.0
"""Seconds a run function may overrun its drain timeout before the CLI cancels it."""


class Start(Protocol):
    """A command's run function with its config bound: runs until shutdown, reports through the task status."""

    def __call__(self, shutdown: Shutdown, /, *, task_status: trio.TaskStatus[Any]) -> Awaitable[object]: ...


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


def _metrics_address(text: str | None) -> HostPort | None:
    """``--metrics HOST:PORT``; a bare port binds loopback (the endpoint is for this machine unless told)."""
    if text is None:
        return None
    return _flag("--metrics", lambda t: parse_hostport(t, default_host="127.0.0.1"), text)  # type: ignore[no-any-return]


def _plan(args: argparse.Namespace, environ: Mapping[str, str]) -> _Plan:
    command: str = args.command
    if command == "server":
        targets = _split_commas(args.allow_target)
        server = ServerConfig.from_sources(
            config_file=args.config,
            listen=None
            if args.listen is None
            else _flag(
                "--listen",
                lambda t: parse_hostport(t, default_host="0.0.0.0", default_port=DEFAULT_SERVER_PORT),
                args.listen,
            ),
            tokens=_tokens_from(args, environ),
            insecure_no_auth=args.insecure_no_auth,
            allow_ports=None if args.allow_ports is None else _flag("--allow-ports", PortSet.parse, args.allow_ports),
            allow_targets=None if targets is None else _flag("--allow-target", TargetAllowlist.parse, targets),
            allow_bind=None if args.allow_bind is None else _flag("--allow-bind", BindAllowlist.parse, args.allow_bind),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            state_dir=args.state_dir,
            insecure_plaintext=args.insecure_plaintext,
            metrics=_metrics_address(args.metrics),
            workers=None if args.workers is None else _flag("--workers", parse_workers, args.workers),
        )
        if not server.tokens:
            logger.warning(
                "authentication is disabled (--insecure-no-auth): anyone who can reach %s can expose ports%s",
                server.listen,
                " and reach the allowed targets" if server.allow_targets else "",
            )
        reload_server = partial(_reload, ServerConfig, args, environ)
        if worker_count(server.workers) > 1:
            return _Plan(command, partial(run_workers, server, reload=reload_server), server.timeouts.drain, server)
        return _Plan(command, partial(run_server, server, reload=reload_server), server.timeouts.drain, server)
    if command == "client":
        client = ClientConfig.from_sources(
            config_file=args.config,
            server=None
            if args.server is None
            else _flag(
                "--server",
                lambda t: parse_hostport(t, allow_zero=False, default_port=DEFAULT_SERVER_PORT),
                args.server,
            ),
            tokens=_tokens_from(args, environ),
            name=args.name,
            remotes=[
                RemoteSpec.parse(text, **({"proxy_protocol": args.proxy_protocol} if args.proxy_protocol else {}))
                for text in args.remotes
            ],
            locals=[LocalSpec.parse(text) for text in args.locals],
            server_fingerprint=_split_commas(args.server_fingerprint),
            tls_ca=args.tls_ca,
            insecure_plaintext=args.insecure_plaintext,
            exit_on_refusal=args.exit_on_refusal,
            metrics=_metrics_address(args.metrics),
        )
        reload_client = partial(_reload, ClientConfig, args, environ)
        return _Plan(command, partial(run_client, client, reload=reload_client), client.timeouts.drain, client)
    if command == "map":
        if args.config is None and (args.listen is None or args.target is None):
            raise ConfigError("map needs LISTEN and TARGET, e.g. trio-tunnel map 0.0.0.0:10022 192.168.0.10:22")
        if args.connect_timeout is not None and not 0 < args.connect_timeout < float("inf"):
            raise ConfigError(f"--connect-timeout: expected seconds > 0, got {args.connect_timeout}")
        if args.max_connections is not None and args.max_connections < 1:
            raise ConfigError(f"--max-connections: expected a count >= 1, got {args.max_connections}")
        listen, listen_protocol = split_protocol(args.listen) if args.listen is not None else (None, "tcp")
        target, target_protocol = split_protocol(args.target) if args.target is not None else (None, "tcp")
        udp = args.udp or "udp" in (listen_protocol, target_protocol)
        mapping = MapConfig.from_sources(
            config_file=args.config,
            listen=None
            if listen is None
            else _flag("LISTEN", lambda t: parse_hostport(t, default_host="0.0.0.0"), listen),
            target=None if target is None else _flag("TARGET", lambda t: parse_hostport(t, allow_zero=False), target),
            connect_timeout=args.connect_timeout,
            max_connections=args.max_connections,
            protocol="udp" if udp else None,
        )
        return _Plan(command, partial(run_map, mapping), mapping.drain_timeout, mapping)
    if command == "demo":
        return _Plan(command, partial(_start_demo, bool(args.once)), Timeouts().drain)
    raise AssertionError(f"unhandled command {command!r}")


def _reload(kind: type[C], args: argparse.Namespace, environ: Mapping[str, str]) -> C:
    """SIGHUP: the same command line read again, with the files it names (``--config``, ``--token-file``, the TLS
    files) as they are now. Raises ConfigError."""
    config = _plan(args, environ).config
    assert isinstance(config, kind)
    return config


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
                notify.stopping()
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
    """``server --print-fingerprint``: the pin of --tls-cert, or of the server's own key (made if missing); with
    --config, the file's tls_cert and state_dir count as the flags would."""
    try:
        tls_cert, _key, state_dir = server_identity_files(
            args.config, tls_cert=args.tls_cert, tls_key=args.tls_key, state_dir=args.state_dir
        )
        if tls_cert is not None:
            value = fingerprint_of_pem_file(tls_cert)
        else:
            value = ServerTls.from_state_dir(state_dir or default_state_dir()).fingerprint
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
    if args.command == "completion":
        sys.stdout.write(completion_script(args.shell, parser))
        return EXIT_OK
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
    if args.command == "status":
        return run_status(args.url, watch=args.watch, as_json=args.json)
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
    tune_malloc()  # the process is ours: the data path's large buffers stay in the heap (see trio_tunnel.memtune)
    sys.exit(run_cli(argv))


if __name__ == "__main__":
    # ``python -m trio_tunnel``: run the importable module, so loggers are named "trio_tunnel.cli", not "__main__".
    from trio_tunnel.cli import main as _main

    _main()
