"""Configuration of the three long-running commands: ``server``, ``client`` and ``map``.

Everything here is pure data plus parsers: no trio, no sockets opened, no environment read (``cli.py`` reads
``TRIO_TUNNEL_TOKEN`` and passes the tokens in). Config classes are ``attrs.frozen(kw_only=True)`` with documented
defaults. Each has two named constructors:

* ``from_toml(path)``: the config from the file's ``[server]``, ``[client]`` or ``[map]`` table alone;
* ``from_sources(config_file=..., <field>=...)``: the file (optional) merged with command-line values. A value given
  on the command line (not ``None``) overrides the file's; ``-R``/``-L`` services are *added* to the file's services,
  replacing a file service of the same name.

Plain construction (``ServerConfig(...)``) validates types and ranges (raising ``ValueError``) but applies no policy;
the named constructors raise :class:`~.errors.ConfigError` with a message that names the file or flag, the key,
and the fix, and they apply the policies a user relies on: a server needs a token unless ``insecure_no_auth``; a
client needs a server address and at least one service; a mapper needs ``listen`` and ``target``.

TOML layout
-----------
One file may hold all three tables; each command reads only its own (and rejects unknown top-level tables). Unknown
keys are errors, with the closest valid key suggested. Relative ``token_file`` paths are relative to the config file.
The seed's case (web -> 9000, ssh -> 9001, mysql -> 9002), plus a forward tunnel and a plain mapper::

    [server]
    listen = "0.0.0.0:7835"                  # HOST:PORT, [IPv6]:PORT or PORT (then 0.0.0.0); default 0.0.0.0:7835
    tokens = ["<token 1>", "<token 2>"]      # several for rotation; or token = "...", or:
    # token_file = "/etc/trio-tunnel/tokens"  # one token per line, '#' comments and blank lines ignored
    # insecure_no_auth = false               # true: run with no authentication (a warning is logged)
    allow_ports = "9000-9010"                # ports clients may expose; default 1024-65535 (0 = "pick one")
    allow_targets = ["10.0.0.0/8:22", "db.internal:5432"]   # -L targets; default: none (deny all)
    max_streams_per_client = 256
    max_connections_per_service = 1024
    max_clients = 1024

    [server.timeouts]                        # seconds; any subset, the rest keep their defaults
    handshake = 10
    keepalive_idle = 15
    keepalive_dead = 45
    drain = 10

    [client]
    server = "tunnel.example.com:7835"
    name = "home"                            # default: this host's name, reduced to [A-Za-z0-9._-], 64 chars
    token_file = "client.token"              # relative to this file; or token = "..."

    [client.timeouts]
    reconnect_initial = 0.5
    reconnect_max = 30

    [client.expose.web]                      # like -R web=0.0.0.0:9000:127.0.0.1:80
    local = "127.0.0.1:80"                   # the local service: HOST:PORT or PORT (then 127.0.0.1)
    remote_port = 9000                       # port on the server; 0 = the server picks a free one
    bind = "0.0.0.0"                         # optional: the server-side address to listen on

    [client.expose.ssh]
    local = "127.0.0.1:22"
    remote_port = 9001

    [client.expose.mysql]
    local = "127.0.0.1:3306"
    remote_port = 9002

    [client.forward.db]                      # like -L db=127.0.0.1:15432:db.internal:5432
    listen = "127.0.0.1:15432"               # where the client listens: HOST:PORT or PORT (then 127.0.0.1)
    target = "db.internal:5432"              # dialled by the server; must be in its allow_targets

    [map]                                    # trio-tunnel map: a plain TCP relay, no server involved
    listen = "0.0.0.0:10022"
    target = "192.168.0.10:22"
    connect_timeout = 10
    max_connections = 1024
    drain_timeout = 10

Specs on the command line
-------------------------
* ``-R [NAME=][bind_address:]port:host:hostport`` (:class:`RemoteSpec`): the server listens on
  ``bind_address:port`` (default 0.0.0.0; port 0 = the server picks), connections reach ``host:hostport`` on the
  client's side. The name defaults to ``host:hostport``.
* ``-L [NAME=][bind_address:]port:host:hostport`` (:class:`LocalSpec`): the client listens on ``bind_address:port``
  (default 127.0.0.1; port 0 = any free port), the server dials ``host:hostport``.
* An empty bind address or ``*`` means all IPv4 interfaces (0.0.0.0), as in ssh. IPv6 addresses go in brackets.
* ``--allow-ports 8000-8999,2222`` (:class:`PortSet`), ``--allow-target 10.0.0.0/8:22,db.internal:5432,127.0.0.1:*``
  (:class:`TargetAllowlist`).
"""

from .addresses import DEFAULT_SERVER_PORT, HostPort, LocalSpec, RemoteSpec, parse_hostport
from .commands import ClientConfig, MapConfig, ServerConfig, Timeouts
from .policy import PortSet, TargetAllowlist, TargetRule
from .tokens import default_client_name, parse_token, parse_token_list, read_token_file

__all__ = [
    "DEFAULT_SERVER_PORT",
    "ClientConfig",
    "HostPort",
    "LocalSpec",
    "MapConfig",
    "PortSet",
    "RemoteSpec",
    "ServerConfig",
    "TargetAllowlist",
    "TargetRule",
    "Timeouts",
    "default_client_name",
    "parse_hostport",
    "parse_token",
    "parse_token_list",
    "read_token_file",
]
