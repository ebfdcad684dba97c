"""Configuration of the three long-running commands: ``server``, ``client`` and ``map``.

Everything here is pure data plus parsers: no trio, no sockets opened, no environment read (``cli.py`` reads
``TRIO_TUNNEL_TOKEN`` and passes the tokens in). The user's reference, every TOML table and key with its type,
default and meaning, and the ``-R``/``-L`` syntax, is docs/CONFIG.md (a test keeps it complete).

Modules: :mod:`.fields` (the value rules and the TOML-key metadata), :mod:`.addresses` (hosts, ports, ``-R``/``-L``
specs), :mod:`.policy` (port sets, target allowlists), :mod:`.tokens` (tokens, client names), :mod:`.toml` (reading
a file), :mod:`.commands` (the three configs and the flags-over-file merge). This module re-exports the names the
rest of trio-tunnel imports.
"""

from .addresses import DEFAULT_SERVER_PORT, HostPort, LocalSpec, RemoteSpec, parse_hostport
from .binds import BindAllowlist
from .commands import ClientConfig, MapConfig, ServerConfig, Timeouts, server_identity_files
from .policy import PortSet, TargetAllowlist, TargetRule
from .tokens import default_client_name, parse_token, parse_token_list, read_token_file

__all__ = [
    "server_identity_files",
    "DEFAULT_SERVER_PORT",
    "BindAllowlist",
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
