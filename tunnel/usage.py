"""The ``trio-tunnel`` command line's grammar: the argument parser, its help texts and examples.

:mod:`trio_tunnel.cli` turns what this parses into configs and runs the command.
"""

from __future__ import annotations

import argparse
from typing import Any, Final, NoReturn

from trio_tunnel import __version__
from trio_tunnel.completion import SHELLS

__all__ = ["DEFAULT_STATUS_URL", "EXIT_USAGE", "PROG", "TOKEN_ENV", "build_parser"]

PROG: Final = "trio-tunnel"
TOKEN_ENV: Final = "TRIO_TUNNEL_TOKEN"
EXIT_USAGE: Final = 2


_DESCRIPTION = """\
Expose services behind NAT through a public server over one multiplexed TCP link (like ssh -R, frp or rathole),
forward local ports to targets reachable from the server (like ssh -L), or relay one port to another (map).

stdout carries one lifecycle line per event (listening, connected, exposed, forwarding, disconnected, refused);
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

  # the link is TLS: on first start the server makes its key (in --state-dir) and prints its fingerprint,
  # which clients pin; this prints it again
  trio-tunnel server --print-fingerprint

  # a certificate from a CA (e.g. Let's Encrypt) instead: clients verify the chain and the host name
  trio-tunnel server --token-file tokens --tls-cert fullchain.pem --tls-key privkey.pem

  # one server process per core on the same link port, supervised by this one (groups need --workers 1)
  trio-tunnel server --token-file tokens --workers auto

stdout: 'fingerprint sha256:...' then 'listening HOST:PORT' once the server accepts clients
(and 'metrics HOST:PORT' with --metrics)."""

_CLIENT_EPILOG = f"""\
examples:
  # expose local web, SSH and MySQL on the server's ports 9000, 9001, 9002; the fingerprint is the one the
  # server printed (trio-tunnel server --print-fingerprint)
  trio-tunnel client --server tunnel.example.com:7835 --token-file token --server-fingerprint sha256:... \\
      -R web=9000:127.0.0.1:80 -R ssh=9001:127.0.0.1:22 -R mysql=9002:127.0.0.1:3306

  # let the server pick a free port (see the 'exposed NAME HOST:PORT' line)
  {TOKEN_ENV}=... trio-tunnel client --server tunnel.example.com:7835 -R 0:localhost:8080

  # nginx behind the tunnel sees the visitor's address ('listen 8080 proxy_protocol;')
  trio-tunnel client --server tunnel.example.com:7835 --token-file token --proxy-protocol v1 -R web=80:127.0.0.1:8080

  # two or more clients (same token) share port 9000 as group 'web'; connections go round-robin to the live ones
  trio-tunnel client --server tunnel.example.com:7835 --token-file token -R web@web=9000:127.0.0.1:8080

  # reach db.internal:5432 (seen from the server) at 127.0.0.1:15432 here
  trio-tunnel client --server tunnel.example.com:7835 --token-file token -L db=15432:db.internal:5432

  # a DNS server behind NAT, on the server's UDP port 5353 (the server needs --allow-ports 5353/udp)
  trio-tunnel client --server tunnel.example.com:7835 --token-file token -R dns=5353:127.0.0.1:53/udp

  # services from a file ([client] table); -R/-L add to them, other flags override it
  trio-tunnel client --config ~/.config/trio-tunnel.toml

spec syntax (-R and -L): [NAME=][bind_address:]port:host:hostport[/udp]; IPv6 in brackets, e.g. [::1]:8080;
-R also NAME@GROUP=... for a load-balancing group.
stdout: 'connected HOST:PORT', 'exposed NAME HOST:PORT', 'forwarding NAME HOST:PORT', 'disconnected REASON',
'refused NAME REASON' (e.g. address_in_use, retried with the reconnect backoff; prohibited), and
'metrics HOST:PORT' with --metrics."""

_MAP_EPILOG = """\
examples:
  # B relays A's connections to C: on B, map port 10022 to SSH on 192.168.0.10
  trio-tunnel map 0.0.0.0:10022 192.168.0.10:22

  # any free port on loopback (see the 'listening HOST:PORT' line), with a shorter connect timeout
  trio-tunnel map 127.0.0.1:0 example.com:80 --connect-timeout 3 --max-connections 100

  # UDP: DNS on 10.0.0.2 reachable on port 5353 here (each source gets its own socket to the target)
  trio-tunnel map --udp 0.0.0.0:5353 10.0.0.2:53

stdout: 'listening HOST:PORT' (for UDP 'listening HOST:PORT/udp') once the listener is bound."""

DEFAULT_STATUS_URL: Final = "http://127.0.0.1:9465"

_STATUS_EPILOG = """\
examples:
  trio-tunnel server --token-file tokens --metrics 127.0.0.1:9465    # then, on the same machine:
  trio-tunnel status                  # one table of sessions and services
  trio-tunnel status --watch          # redrawn every second, with byte rates, like top
  trio-tunnel status http://127.0.0.1:9466 --json

exit codes: 0 shown, 1 nothing answers at URL or it is not a trio-tunnel endpoint."""

_DEMO_EPILOG = """\
examples:
  trio-tunnel demo          # keeps running until Ctrl+C, so you can try the printed URL yourself
  trio-tunnel demo --once   # exit after the check (0 when the page came through)"""


_COMPLETION_EPILOG = """\
examples:
  source <(trio-tunnel completion bash)      # this shell only; add the line to ~/.bashrc to keep it
  trio-tunnel completion bash > ~/.local/share/bash-completion/completions/trio-tunnel
  trio-tunnel completion zsh > "${fpath[1]}/_trio-tunnel"   # then start a new zsh (compinit)"""


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
    server.add_argument(
        "--listen", metavar="HOST:PORT", help="where clients connect (default 0.0.0.0:7835; HOST alone: port 7835)"
    )
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
        help="ports clients may expose, e.g. 8000-8999,2222,5353/udp (default 1024-65535; UDP only when listed "
        "with /udp)",
    )
    server.add_argument(
        "--allow-target",
        action="append",
        metavar="SPEC",
        help="where -L clients may reach, e.g. 10.0.0.0/8:22,db.internal:5432,127.0.0.1:*,10.0.0.2:53/udp "
        "(repeatable; default: nowhere; a rule without /udp is TCP only)",
    )
    server.add_argument(
        "--allow-bind",
        action="append",
        metavar="ADDRS",
        help="addresses clients may ask the server to listen on for -R, e.g. 0.0.0.0,192.0.2.7 or '*' for any "
        "(repeatable; default: 0.0.0.0, :: and the --listen address)",
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
    server.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics, /status (JSON) and a dashboard at / over HTTP here "
        "(a bare PORT binds 127.0.0.1; see 'trio-tunnel status')",
    )
    server.add_argument(
        "--workers",
        metavar="N",
        help="server processes sharing the link port, supervised by this one ('auto': one per core; default 1). "
        "Load-balancing groups need 1",
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
    client.add_argument("--server", metavar="HOST:PORT", help="the server to connect to (HOST alone: port 7835)")
    _add_token_options(client)
    client.add_argument("--name", metavar="NAME", help="this client's identity (default: the host name)")
    client.add_argument(
        "-R",
        action="append",
        default=[],
        dest="remotes",
        metavar="SPEC",
        help="expose a local service on the server: [NAME[@GROUP]=][bind_address:]port:host:hostport (repeatable; "
        "@GROUP shares the port with the group's other clients)",
    )
    client.add_argument(
        "--proxy-protocol",
        choices=("v1", "v2"),
        help="write a PROXY protocol header (HAProxy's, v1 text or v2 binary) with the external user's address to "
        "the local service of every -R of this command",
    )
    client.add_argument(
        "-L",
        action="append",
        default=[],
        dest="locals",
        metavar="SPEC",
        help="forward a local port to a target the server dials: [NAME=][bind_address:]port:host:hostport (repeatable)",
    )
    client.add_argument(
        "--exit-on-refusal",
        action="store_true",
        default=None,
        help="exit 1 when the server refuses a service (default: retry a port in use, carry on without others)",
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
    client.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics, /status (JSON) and a dashboard at / over HTTP here "
        "(a bare PORT binds 127.0.0.1; see 'trio-tunnel status')",
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
    mapper.add_argument(
        "--udp", action="store_true", default=None, help="relay UDP datagrams (also: a /udp suffix on TARGET)"
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

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script for bash or zsh",
        description="Print a completion script for SHELL, made from this version's options.",
        epilog=_COMPLETION_EPILOG,
        formatter_class=formatter,
    )
    completion.add_argument("shell", choices=SHELLS, help="bash or zsh")
    status = commands.add_parser(
        "status",
        help="show the sessions and services of a server or client started with --metrics",
        description="Read /status from a server's or client's --metrics endpoint and print it as tables.",
        epilog=_STATUS_EPILOG,
        formatter_class=formatter,
    )
    status.add_argument(
        "url", nargs="?", default=DEFAULT_STATUS_URL, metavar="URL", help=f"the endpoint (default {DEFAULT_STATUS_URL})"
    )
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--watch", action="store_true", help="redraw every second until Ctrl+C, with rates")
    shown.add_argument("--json", action="store_true", help="print the /status document as it is")
    _add_logging_options(status, suffix="command")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# From arguments to a config
