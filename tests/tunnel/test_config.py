"""tunnel.config: spec parsers, port sets, target allowlists, TOML loading and the flags-over-file merge."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import textwrap
from pathlib import Path

import attrs
import pytest
from trio_tunnel.config import (
    ClientConfig,
    HostPort,
    LocalSpec,
    MapConfig,
    PortSet,
    RemoteSpec,
    ServerConfig,
    TargetAllowlist,
    TargetRule,
    Timeouts,
    default_client_name,
    parse_hostport,
    parse_token,
    parse_token_list,
    read_token_file,
)
from trio_tunnel.errors import ConfigError

TOKEN = b"0123456789abcdef-token"

# --------------------------------------------------------------------------------------------------------------------
# HostPort


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("example.com:1", "example.com", 1),
        ("[::1]:80", "::1", 80),
        ("[fe80::1%eth0]:22", "fe80::1%eth0", 22),
        ("8080", "127.0.0.1", 8080),
        (":8080", "127.0.0.1", 8080),
        ("localhost:0", "localhost", 0),
        ("  db.internal:5432 ", "db.internal", 5432),
        ("under_score.example:65535", "under_score.example", 65535),
    ],
)
def test_parse_hostport_valid(text: str, host: str, port: int) -> None:
    assert parse_hostport(text) == HostPort(host=host, port=port)


def test_parse_hostport_default_host_and_str() -> None:
    assert parse_hostport("7835", default_host="0.0.0.0") == HostPort(host="0.0.0.0", port=7835)
    assert str(HostPort(host="::1", port=80)) == "[::1]:80"
    assert str(HostPort(host="10.0.0.1", port=22)) == "10.0.0.1:22"
    assert HostPort.parse("[::]:7835") == HostPort(host="::", port=7835)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("::1:80", "brackets"),
        ("host", "missing ':PORT'"),
        ("host:", "the port is missing"),
        ("host:abc", "'abc' is not a number"),
        ("host:65536", "out of range 0-65535"),
        ("host:-1", "'-1' is not a number"),
        ("[::1]80", "expected ':PORT' after ']'"),
        ("[::1:80", "without a closing ']'"),
        ("[localhost]:80", "only for IPv6"),
        ("1.2.3.999:80", "not a valid IPv4 address"),
        ("bad host:80", "not a valid host name"),
        ("", "the port is missing"),
    ],
)
def test_parse_hostport_invalid(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_hostport(text)
    message = str(info.value)
    assert repr(text.strip()) in message
    assert problem in message
    assert "HOST:PORT" in message and "e.g." in message


def test_parse_hostport_zero_refused_when_asked() -> None:
    with pytest.raises(ConfigError, match="out of range 1-65535"):
        parse_hostport("example.com:0", allow_zero=False)


def test_hostport_constructor_validates() -> None:
    with pytest.raises(ValueError, match="port"):
        HostPort(host="a", port=70000)
    with pytest.raises(ValueError, match="host"):
        HostPort(host="", port=1)
    with pytest.raises(TypeError):
        HostPort(host="a", port=True)


# --------------------------------------------------------------------------------------------------------------------
# -R / -L specs


@pytest.mark.parametrize(
    ("text", "name", "bind_host", "bind_port", "target_host", "target_port"),
    [
        ("9000:127.0.0.1:80", "127.0.0.1:80", "0.0.0.0", 9000, "127.0.0.1", 80),
        ("web=9000:127.0.0.1:80", "web", "0.0.0.0", 9000, "127.0.0.1", 80),
        ("0:localhost:8080", "localhost:8080", "0.0.0.0", 0, "localhost", 8080),
        ("127.0.0.1:9001:127.0.0.1:22", "127.0.0.1:22", "127.0.0.1", 9001, "127.0.0.1", 22),
        ("*:9001:h:22", "h:22", "0.0.0.0", 9001, "h", 22),
        (":9001:h:22", "h:22", "0.0.0.0", 9001, "h", 22),
        ("[::]:9000:[::1]:80", "[::1]:80", "::", 9000, "::1", 80),
        ("v6=[::1]:0:[fd00::2]:3306", "v6", "::1", 0, "fd00::2", 3306),
        ("my.svc-1_a=9002:db:3306", "my.svc-1_a", "0.0.0.0", 9002, "db", 3306),
    ],
)
def test_remote_spec_valid(
    text: str, name: str, bind_host: str, bind_port: int, target_host: str, target_port: int
) -> None:
    spec = RemoteSpec.parse(text)
    assert (spec.name, spec.bind_host, spec.bind_port, spec.target_host, spec.target_port) == (
        name,
        bind_host,
        bind_port,
        target_host,
        target_port,
    )
    assert RemoteSpec.parse(str(spec)) == spec  # str() is a spec that parses back to the same thing


def test_local_spec_defaults_to_loopback() -> None:
    spec = LocalSpec.parse("15432:db.internal:5432")
    assert spec == LocalSpec(bind_host="127.0.0.1", bind_port=15432, target_host="db.internal", target_port=5432)
    assert spec.name == "db.internal:5432"
    assert spec.bind == HostPort(host="127.0.0.1", port=15432)
    assert spec.target == HostPort(host="db.internal", port=5432)
    assert LocalSpec.parse("db=0.0.0.0:0:10.0.0.5:22").bind == HostPort(host="0.0.0.0", port=0)
    assert LocalSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("abc", "expected 3 or 4 fields"),
        ("9000:127.0.0.1", "expected 3 or 4 fields"),
        ("1:2:3:4:5", "too many ':'"),
        ("9000:::1:80", "brackets"),
        ("70000:a:1", "out of range 0-65535"),
        ("9000:a:0", "out of range 1-65535"),
        ("9000:a:ssh", "'ssh' is not a number"),
        ("x y=1:a:2", "service name 'x y'"),
        ("=1:a:2", "service name ''"),
        ("[::1:9000:a:2", "without a closing ']'"),
        ("9000:[a]:2", "only for IPv6"),
        ("[::1]9000:a:2", "expected ':'"),
        ("9000:bad_host!:80", "not a valid host name"),
        ("999.0.0.1:9000:a:80", "bind address"),
        ("9000::80", "the host is empty"),
    ],
)
def test_remote_spec_invalid(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        RemoteSpec.parse(text)
    message = str(info.value)
    assert message.startswith(f"invalid -R spec {text!r}: ")
    assert problem in message
    assert "[NAME=][bind_address:]port:host:hostport" in message
    assert "e.g. 'web=9000:127.0.0.1:80'" in message


def test_local_spec_invalid_names_l() -> None:
    with pytest.raises(ConfigError, match=r"^invalid -L spec '15432:db': .*e\.g\. 'db=15432:db.internal:5432'"):
        LocalSpec.parse("15432:db")


def test_spec_constructor_validates() -> None:
    with pytest.raises(ValueError, match="target_port"):
        RemoteSpec(bind_port=1, target_host="a", target_port=0)
    with pytest.raises(ValueError, match="service name"):
        RemoteSpec(name="a b", bind_port=1, target_host="a", target_port=1)
    assert RemoteSpec(bind_port=1, target_host="::1", target_port=2).name == "[::1]:2"


# --------------------------------------------------------------------------------------------------------------------
# PortSet


def test_portset_default_is_every_unprivileged_port() -> None:
    ports = PortSet.default()
    assert ports == PortSet()
    assert 0 in ports and 1024 in ports and 65535 in ports
    assert 1023 not in ports and 80 not in ports and 65536 not in ports and -1 not in ports
    assert ports.allows_any_unprivileged
    assert str(ports) == "1024-65535"
    assert "1024" not in ports and True not in ports


def test_portset_parse_membership_and_merge() -> None:
    ports = PortSet.parse("8000-8999,2222, 8500-9100,9101")
    assert ports.ranges == ((2222, 2222), (8000, 9101))
    assert str(ports) == "2222,8000-9101"
    assert [p in ports for p in (0, 2221, 2222, 2223, 7999, 8000, 9101, 9102)] == [
        True,
        False,
        True,
        False,
        False,
        True,
        True,
        False,
    ]
    assert len(ports) == 1 + 1102
    assert list(PortSet.parse("5,3-4"))[:3] == [3, 4, 5]
    assert not ports.allows_any_unprivileged
    assert PortSet.parse(["80", 443, "1024-65535"]).allows_any_unprivileged
    assert 80 in PortSet.parse("80")  # privileged ports only when listed


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "empty"),
        ("0", "port 0 cannot be listed"),
        ("9000-8000", "reversed (write 8000-9000)"),
        ("http", "'http' is not a number"),
        ("1,,2", "stray comma"),
        ("8000-", "the port is missing"),
        ("70000", "out of range 1-65535"),
        ("1-2-3", "'2-3' is not a number"),
    ],
)
def test_portset_invalid(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        PortSet.parse(spec)
    assert problem in str(info.value)
    assert repr(spec) in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Target allowlist


def test_allowlist_denies_everything_by_default() -> None:
    allowlist = TargetAllowlist()
    assert not allowlist
    assert not allowlist.allows("127.0.0.1", 22)
    assert not allowlist.allows("localhost", 80)
    assert TargetAllowlist.deny_all() == allowlist


ALLOW = TargetAllowlist.parse("10.0.0.0/8:22,db.internal:5432,127.0.0.1:*,[fd00::/8]:8000-8999")


@pytest.mark.parametrize(
    ("host", "port", "allowed"),
    [
        ("10.1.2.3", 22, True),
        ("10.255.255.255", 22, True),
        ("10.1.2.3", 23, False),
        ("11.0.0.1", 22, False),
        ("::ffff:10.0.0.1", 22, True),  # IPv4-mapped IPv6 is checked as IPv4
        ("db.internal", 5432, True),
        ("DB.Internal.", 5432, True),  # names: case-insensitive, trailing dot ignored
        ("db.internal", 5433, False),
        ("x.db.internal", 5432, False),
        ("127.0.0.1", 1, True),
        ("127.0.0.1", 65535, True),
        ("127.0.0.2", 80, False),
        ("localhost", 80, False),  # a name is never resolved to be checked against an address rule
        ("127.1", 80, False),  # nor is a non-canonical address spelling
        ("fd00::1", 8000, True),
        ("[fd00::1]", 8999, True),
        ("fd00::1", 9000, False),
        ("fe80::1", 8000, False),
        ("bad host", 5432, False),
        ("127.0.0.1", 0, False),
    ],
)
def test_allowlist_allows(host: str, port: int, allowed: bool) -> None:
    assert ALLOW.allows(host, port) is allowed


def test_allowlist_parse_forms() -> None:
    assert TargetAllowlist.parse(["10.0.0.0/8:22", "a:1,b:2"]).rules == (
        TargetRule.parse("10.0.0.0/8:22"),
        TargetRule.parse("a:1"),
        TargetRule.parse("b:2"),
    )
    rule = TargetRule.parse("10.1.2.3/8:22")  # host bits are ignored
    assert rule.network == ipaddress.ip_network("10.0.0.0/8")
    assert str(TargetAllowlist.parse("[::1]:22,1.2.3.4:*,Db.Example.:1-9")) == "[::1]:22,1.2.3.4:*,db.example:1-9"
    assert str(TargetAllowlist()) == "(none)"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("db.internal", "missing ':PORT'"),
        ("*:22", "open proxy"),
        ("10.0.0.0/33:22", "does not appear to be"),
        ("::1:22", "must be written in brackets"),
        ("[::1]", "[ADDRESS/BITS]:PORTS"),
        ("h:0", "out of range 1-65535"),
        ("h:9-1", "reversed"),
        (":22", "the host is empty"),
        ("bad host:22", "not a valid host name"),
        ("a:1,", "stray comma"),
        ("", "empty"),
    ],
)
def test_allowlist_invalid(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        TargetAllowlist.parse(spec)
    assert problem in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Timeouts, tokens, names


def test_timeouts_defaults_and_validation() -> None:
    t = Timeouts()
    assert (t.handshake, t.connect, t.keepalive_idle, t.keepalive_dead, t.drain, t.open) == (10, 10, 15, 45, 10, 10)
    assert (t.reconnect_initial, t.reconnect_max, t.reconnect_jitter) == (0.5, 30, 0.2)
    assert Timeouts(handshake=3).handshake == 3.0
    with pytest.raises(ValueError, match="keepalive_dead"):
        Timeouts(keepalive_idle=30, keepalive_dead=30)
    with pytest.raises(ValueError, match="reconnect_max"):
        Timeouts(reconnect_initial=5, reconnect_max=1)
    with pytest.raises(ValueError, match="positive"):
        Timeouts(connect=0)
    with pytest.raises(ValueError, match="jitter"):
        Timeouts(reconnect_jitter=1.0)
    with pytest.raises(TypeError):
        Timeouts(open="10")  # type: ignore[arg-type]


def test_tokens(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_token("  s3cret-s3cret-s3cret\n", source="x") == b"s3cret-s3cret-s3cret"
    assert parse_token_list("aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbbbb", source="ENV") == (b"a" * 16, b"b" * 18)
    assert parse_token("pässwört-pässwört", source="x") == "pässwört-pässwört".encode()
    with pytest.raises(ConfigError, match=r"^ENV: the token is empty; make one with: python3 -c"):
        parse_token_list("aaaaaaaaaaaaaaaa,,", source="ENV")
    with caplog.at_level(logging.WARNING, logger="trio_tunnel.config"):
        assert parse_token("short", source="--token") == b"short"
    assert "--token: the token is only 5 characters long" in caplog.text
    assert "short" not in caplog.text.replace("--token: the token is only", "")  # the token itself is not logged


def test_token_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text("# rotated 2026-11\n\n  first-token-0123456789  \n#old-token-0123456789\nsecond-token-0123456789\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="trio_tunnel.config"):
        assert read_token_file(path) == (b"first-token-0123456789", b"second-token-0123456789")
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="trio_tunnel.config"):
        read_token_file(path)
    assert "accessible by other users" in caplog.text and "chmod 600" in caplog.text
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ConfigError, match=r"empty: token file holds no token"):
        read_token_file(empty)
    with pytest.raises(ConfigError, match=r"missing: token file not found"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"cannot read token file"):
        read_token_file(tmp_path)


def test_default_client_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "My Laptop (home)")
    assert default_client_name() == "My-Laptop--home"
    monkeypatch.setattr("socket.gethostname", lambda: "x" * 100)
    assert default_client_name() == "x" * 64
    monkeypatch.setattr("socket.gethostname", lambda: "ßü")
    assert default_client_name() == "client"
    monkeypatch.setattr("socket.gethostname", lambda: "box-1.lan")
    assert ClientConfig(server=HostPort(host="a", port=1)).name == "box-1.lan"


# --------------------------------------------------------------------------------------------------------------------
# Config classes and the merge


def test_server_config_defaults() -> None:
    cfg = ServerConfig()
    assert cfg.listen == HostPort(host="0.0.0.0", port=7835)
    assert cfg.tokens == () and not cfg.insecure_no_auth
    assert cfg.allow_ports == PortSet() and not cfg.allow_targets
    assert (cfg.max_streams_per_client, cfg.max_connections_per_service, cfg.max_clients) == (256, 1024, 1024)
    assert cfg.timeouts == Timeouts()
    with pytest.raises(ValueError, match="max_clients"):
        ServerConfig(max_clients=0)


def test_server_from_sources_requires_a_token() -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_sources()
    message = str(info.value)
    for hint in ("--token-file", "TRIO_TUNNEL_TOKEN", "secrets.token_urlsafe(32)", "--insecure-no-auth"):
        assert hint in message
    assert "\n" not in message
    assert ServerConfig.from_sources(insecure_no_auth=True).insecure_no_auth
    assert ServerConfig.from_sources(tokens=[TOKEN, TOKEN, b"other-token-0123456"]).tokens == (
        TOKEN,
        b"other-token-0123456",
    )


def test_server_tokens_win_over_insecure(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="trio_tunnel.config"):
        cfg = ServerConfig.from_sources(tokens=[TOKEN], insecure_no_auth=True)
    assert cfg.tokens == (TOKEN,) and not cfg.insecure_no_auth
    assert "insecure_no_auth is ignored" in caplog.text


def test_client_from_sources_needs_server_and_services() -> None:
    spec = RemoteSpec.parse("web=9000:127.0.0.1:80")
    with pytest.raises(ConfigError, match=r"no server address: pass --server HOST:PORT"):
        ClientConfig.from_sources(remotes=[spec])
    with pytest.raises(ConfigError, match=r"nothing to do: expose a local service with -R"):
        ClientConfig.from_sources(server=HostPort(host="a", port=1))
    cfg = ClientConfig.from_sources(server=HostPort(host="a", port=1), remotes=[spec], tokens=[b"t1" * 8, b"t2" * 8])
    assert cfg.token == b"t1" * 8 and cfg.remotes == (spec,) and cfg.locals == ()
    with pytest.raises(ConfigError, match=r"--name 'a b'"):
        ClientConfig.from_sources(server=HostPort(host="a", port=1), remotes=[spec], name="a b")
    with pytest.raises(ConfigError, match=r"two -R services are named 'web'"):
        ClientConfig.from_sources(server=HostPort(host="a", port=1), remotes=[spec, spec])
    with pytest.raises(ValueError, match="port 0 cannot be dialled"):
        ClientConfig(server=HostPort(host="a", port=0))


def test_client_duplicate_listen_addresses() -> None:
    a = LocalSpec.parse("a=15432:db:5432")
    b = LocalSpec.parse("b=15432:db2:5432")
    with pytest.raises(ConfigError, match=r"two -L services listen on 127.0.0.1:15432"):
        ClientConfig.from_sources(server=HostPort(host="a", port=1), locals=[a, b])
    zero = [LocalSpec.parse("a=0:db:5432"), LocalSpec.parse("b=0:db2:5432")]
    assert len(ClientConfig.from_sources(server=HostPort(host="a", port=1), locals=zero).locals) == 2


def test_map_from_sources() -> None:
    cfg = MapConfig.from_sources(listen=parse_hostport("10022", default_host="0.0.0.0"), target=parse_hostport("c:22"))
    assert (str(cfg.listen), str(cfg.target), cfg.connect_timeout, cfg.max_connections, cfg.drain_timeout) == (
        "0.0.0.0:10022",
        "c:22",
        10.0,
        1024,
        10.0,
    )
    with pytest.raises(ConfigError, match="no target address"):
        MapConfig.from_sources(listen=parse_hostport("1"))
    with pytest.raises(ConfigError, match="map config: target c:0: port 0 cannot be dialled"):
        MapConfig.from_sources(listen=parse_hostport("1"), target=HostPort(host="c", port=0))


# --------------------------------------------------------------------------------------------------------------------
# TOML


CONFIG_DOC = Path(__file__).parents[2] / "docs" / "CONFIG.md"


def _docs_example() -> str:
    """The TOML block under "## Full example" in docs/CONFIG.md."""
    doc = CONFIG_DOC.read_text()
    section = doc[doc.index("## Full example") :]
    start = section.index("```toml\n") + len("```toml\n")
    return section[start : section.index("```", start)]


def test_toml_full_example_from_the_docs(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text(_docs_example())
    (tmp_path / "client.token").write_text("client-token-0123456789\n")
    (tmp_path / "client.token").chmod(0o600)

    server = ServerConfig.from_toml(path)
    assert server.listen == HostPort(host="0.0.0.0", port=7835)
    assert server.tokens == (b"<token 1>", b"<token 2>")
    assert list(server.allow_ports) == list(range(9000, 9011))
    assert server.allow_targets.allows("10.9.8.7", 22) and server.allow_targets.allows("db.internal", 5432)
    assert server.timeouts == Timeouts(handshake=10, keepalive_idle=15, keepalive_dead=45, drain=10)

    client = ClientConfig.from_toml(path)
    assert client.server == HostPort(host="tunnel.example.com", port=7835)
    assert client.name == "home"
    assert client.token == b"client-token-0123456789"  # relative to the config file, not the working directory
    assert client.timeouts.reconnect_max == 30
    assert [(r.name, r.bind_host, r.bind_port, r.target_host, r.target_port) for r in client.remotes] == [
        ("web", "0.0.0.0", 9000, "127.0.0.1", 80),
        ("ssh", "0.0.0.0", 9001, "127.0.0.1", 22),
        ("mysql", "0.0.0.0", 9002, "127.0.0.1", 3306),
    ]
    assert client.locals == (
        LocalSpec(name="db", bind_host="127.0.0.1", bind_port=15432, target_host="db.internal", target_port=5432),
    )

    mapping = MapConfig.from_toml(path)
    assert (str(mapping.listen), str(mapping.target)) == ("0.0.0.0:10022", "192.168.0.10:22")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.toml"
    path.write_text(textwrap.dedent(text))
    return path


def _error(load: object, path: Path) -> str:
    assert callable(load)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_toml_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [client]
        server = "h:1"
        [client.expose.web]
        local = "127.0.0.1:80"
        remote_prot = 9000
        """,
    )
    message = _error(ClientConfig.from_toml, path)
    assert "client.expose.web.remote_prot: unknown key; did you mean 'remote_port'?" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nlisten_addr = '1'\n", "server.listen_addr: unknown key; did you mean 'listen'?"),
        ("[server]\nzzz = 1\n", "server.zzz: unknown key; valid keys: listen, token, tokens"),
        ("[sever]\n", "sever: unknown table; did you mean [server]?"),
        ("[server.timeouts]\nhandshak = 3\n", "server.timeouts.handshak: unknown key; did you mean 'handshake'?"),
        ("[client]\n", "no [server] table in this file"),
        ("[server]\nlisten = 'nope:'\n", "server.listen: invalid address 'nope:': the port is missing"),
        ("[server]\nlisten = true\n", 'server.listen: expected "HOST:PORT", got the boolean true'),
        ("[server]\ntokens = 'abc'\n", "server.tokens: expected a list of strings, got 'abc'"),
        ("[server]\ntoken = ' '\n", "server.token: "),
        ("[server]\ninsecure_no_auth = 'yes'\n", "server.insecure_no_auth: expected true or false, got 'yes'"),
        ("[server]\nallow_ports = '9000-'\n", "server.allow_ports: invalid port set '9000-'"),
        ("[server]\nallow_ports = 1.5\n", "server.allow_ports: expected a string like"),
        ("[server]\nallow_ports = 0\n", "server.allow_ports: invalid port set: port 0 cannot be listed"),
        ("[server]\nallow_targets = '*:22'\n", "server.allow_targets: invalid target rule '*:22'"),
        ("[server]\nallow_targets = [1]\n", "server.allow_targets: expected a string or a list of strings"),
        ("[server]\nmax_clients = 0\n", "server.max_clients: expected an integer count >= 1, got 0"),
        ("[server]\nmax_clients = '5'\n", "got '5' (a string: remove the quotes)"),
        ("[server.timeouts]\nhandshake = 'ten'\n", "server.timeouts.handshake: expected a number of seconds > 0"),
        ("[server.timeouts]\ndrain = -1\n", "server.timeouts.drain: expected a number of seconds > 0, got -1"),
        ("[server.timeouts]\nkeepalive_idle = 60\n", "server.timeouts: keepalive_dead (45) must be longer"),
        ("[server.timeouts]\nreconnect_jitter = 2\n", "reconnect_jitter: expected a fraction"),
        ("[server]\ntimeouts = 5\n", "server.timeouts: expected a table ([server.timeouts]), got 5"),
        ("server = 1\n", "server: expected a table ([server]), got 1"),
        ("[server]\ntoken_file = 'nope'\n", "server.token_file: "),
    ],
)
def test_toml_server_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    assert expected in _error(ServerConfig.from_toml, path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[client.expose.web]\nlocal = '127.0.0.1:80'\nremote_port = 'abc'\n",
            "client.expose.web.remote_port: expected an integer port 0-65535, got 'abc'",
        ),
        (
            "[client.expose.web]\nlocal = '127.0.0.1:80'\nremote_port = 70000\n",
            "client.expose.web.remote_port: expected an integer port 0-65535, got 70000",
        ),
        ("[client.expose.web]\nremote_port = 1\n", "client.expose.web.local: missing: the local service"),
        ("[client.expose.web]\nlocal = 80\n", "client.expose.web.remote_port: missing"),
        ("[client.expose.web]\nlocal = '80'\nremote_port = 1\nbind = 'a b'\n", "client.expose.web.bind: "),
        ("[client.expose.web]\nlocal = 'h:0'\nremote_port = 1\n", "client.expose.web.local: invalid address"),
        ('[client.expose."a b"]\nlocal = 80\nremote_port = 1\n', 'client.expose."a b": service name'),
        ("[client.expose]\nweb = 9000\n", "client.expose.web: expected a table"),
        ("[client.forward.db]\ntarget = 'db:5432'\n", "client.forward.db.listen: missing"),
        ("[client.forward.db]\nlisten = 1\ntarget = 'db'\n", "client.forward.db.target: invalid address 'db'"),
        ("[client.forward.db]\nlisten = 1\ntraget = 'db:1'\n", "did you mean 'target'?"),
        (
            "[client.forward.a]\nlisten = 1\ntarget = 'a:1'\n[client.forward.b]\nlisten = 1\ntarget = 'b:1'\n",
            "client.forward: two -L services listen on 127.0.0.1:1",
        ),
        ("[client]\nname = 'a b'\n", "client.name: a client name is"),
        ("[client]\nserver = 'h:0'\n", "client.server: invalid address 'h:0'"),
        ("[client]\nexpos = 1\n", "did you mean 'expose'?"),
    ],
)
def test_toml_client_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, '[client]\nserver = "h:1"\n' + text if not text.startswith("[client]\n") else text)
    assert expected in _error(ClientConfig.from_toml, path)


def test_toml_missing_unreadable_and_syntax_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert _error(ServerConfig.from_toml, missing) == f"{missing}: config file not found"
    assert "cannot read config file" in _error(ServerConfig.from_toml, tmp_path)
    bad = _write(tmp_path, '[server]\nlisten = "0.0.0.0:1"\ntokens = ["a",\n\nmax_clients 3\n')
    message = _error(ServerConfig.from_toml, bad)
    assert message.startswith(f"{bad}: invalid TOML: ")
    assert re.search(r"line [0-9]+", message)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"[server]\nlisten = '\xff'\n")
    assert "not valid UTF-8" in _error(ServerConfig.from_toml, binary)
    if os.geteuid() != 0:  # root reads anything
        locked = _write(tmp_path, "[server]\n")
        locked.chmod(0)
        assert "cannot read config file: Permission denied" in _error(ServerConfig.from_toml, locked)


def test_toml_relative_token_file_and_token_forms(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tok").write_text("file-token-0123456789\n")
    path = tmp_path / "sub" / "conf.toml"
    path.write_text(
        "[server]\ntoken = 'single-token-0123456789'\ntokens = ['list-token-0123456789']\ntoken_file = 'tok'\n"
    )
    assert ServerConfig.from_toml(path).tokens == (
        b"list-token-0123456789",
        b"single-token-0123456789",
        b"file-token-0123456789",
    )


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [server]
        listen = "127.0.0.1:7000"
        tokens = ["file-token-0123456789"]
        allow_ports = "9000-9010"
        allow_targets = "10.0.0.0/8:22"
        max_clients = 7

        [client]
        server = "file.example:7000"
        name = "from-file"
        token = "file-token-0123456789"
        [client.expose.web]
        local = 80
        remote_port = 9000
        [client.expose.ssh]
        local = 22
        remote_port = 9001
        [client.forward.db]
        listen = 15432
        target = "db:5432"

        [map]
        listen = 10022
        target = "c:22"
        connect_timeout = 3
        """,
    )
    server = ServerConfig.from_sources(config_file=path)
    assert (str(server.listen), server.tokens, str(server.allow_ports), server.max_clients) == (
        "127.0.0.1:7000",
        (b"file-token-0123456789",),
        "9000-9010",
        7,
    )
    server = ServerConfig.from_sources(
        config_file=path,
        listen=parse_hostport("0.0.0.0:8000"),
        tokens=[TOKEN],
        allow_ports=PortSet.parse("2222"),
        allow_targets=TargetAllowlist.parse("db:5432"),
    )
    assert (str(server.listen), server.tokens, str(server.allow_ports), str(server.allow_targets)) == (
        "0.0.0.0:8000",
        (TOKEN,),
        "2222",
        "db:5432",
    )
    assert server.max_clients == 7  # not overridden: kept from the file

    client = ClientConfig.from_sources(
        config_file=path,
        server=parse_hostport("flag.example:7001"),
        name="from-flag",
        tokens=[TOKEN],
        remotes=[RemoteSpec.parse("ssh=9005:127.0.0.1:2222"), RemoteSpec.parse("9006:127.0.0.1:8080")],
        locals=[LocalSpec.parse("cache=16379:redis:6379")],
    )
    assert (str(client.server), client.name, client.token) == ("flag.example:7001", "from-flag", TOKEN)
    assert [str(r) for r in client.remotes] == [
        "web=0.0.0.0:9000:127.0.0.1:80",
        "ssh=0.0.0.0:9005:127.0.0.1:2222",  # the flag's ssh replaced the file's, in place
        "127.0.0.1:8080=0.0.0.0:9006:127.0.0.1:8080",
    ]
    assert [s.name for s in client.locals] == ["db", "cache"]
    untouched = ClientConfig.from_sources(config_file=path)
    assert (str(untouched.server), untouched.name, untouched.token) == (
        "file.example:7000",
        "from-file",
        b"file-token-0123456789",
    )

    mapping = MapConfig.from_sources(config_file=path, target=parse_hostport("d:2222"), max_connections=5)
    assert (str(mapping.listen), str(mapping.target), mapping.connect_timeout, mapping.max_connections) == (
        "0.0.0.0:10022",
        "d:2222",
        3.0,
        5,
    )


def test_configs_are_frozen() -> None:
    cfg = ServerConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.max_clients = 5  # type: ignore[misc]
    assert attrs.evolve(cfg, max_clients=5).max_clients == 5
