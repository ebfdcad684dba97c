"""--allow-bind (trio_tunnel.config.binds), the refusal words (trio_tunnel.refusal) and HOST without a port."""

from __future__ import annotations

from pathlib import Path

import pytest
from trio_tunnel.config import (
    DEFAULT_SERVER_PORT,
    BindAllowlist,
    ClientConfig,
    RemoteSpec,
    ServerConfig,
    parse_hostport,
)
from trio_tunnel.config.binds import bind_name_warnings, bind_refusal, looks_like_service_name
from trio_tunnel.errors import ConfigError
from trio_tunnel.proto import ErrorCode
from trio_tunnel.refusal import ServiceRefusedError, can_heal, reason_word


def test_default_allows_the_wildcards_and_the_listen_address_only() -> None:
    allowed = BindAllowlist().effective("127.0.0.1")
    for host in ("0.0.0.0", "::", "0:0::0", "127.0.0.1", "[::]"):
        assert allowed.allows(host), host
    for host in ("127.0.0.2", "::1", "web", "localhost", "192.0.2.7"):
        assert not allowed.allows(host), host
    assert str(allowed) == "0.0.0.0,[::],127.0.0.1"
    assert BindAllowlist().effective("0.0.0.0").hosts == ("0.0.0.0", "::")


def test_a_list_replaces_the_default() -> None:
    allowed = BindAllowlist.parse(["192.0.2.7, [2001:db8::1]", "Edge.Example."]).effective("0.0.0.0")
    assert allowed.hosts == ("192.0.2.7", "2001:db8::1", "edge.example")
    assert allowed.allows("2001:DB8:0::1")
    assert allowed.allows("edge.example")
    assert not allowed.allows("0.0.0.0")


def test_star_allows_any() -> None:
    allowed = BindAllowlist.parse("*").effective("127.0.0.1")
    assert allowed.any and allowed.allows("web") and allowed.allows("10.1.2.3")
    assert str(allowed) == "*"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0.0.0.0,,::", "empty entry"),
        ("a b", "invalid bind address 'a b'"),
        ("999.1.1.1", "not a valid IPv4 address"),
        ([], "the bind address list is empty"),
    ],
)
def test_bad_lists(spec: str | list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BindAllowlist.parse(spec)


def test_toml_allow_bind(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[server]\ntoken = "0123456789abcdef0123"\nallow_bind = ["*"]\n')
    assert ServerConfig.from_toml(path).allow_bind.any
    path.write_text('[server]\ntoken = "0123456789abcdef0123"\nallow_bind = 5\n')
    with pytest.raises(ConfigError, match=r"server\.allow_bind: expected a string"):
        ServerConfig.from_toml(path)


def test_the_refusal_names_the_flag() -> None:
    message = bind_refusal("web", BindAllowlist().effective("0.0.0.0"))
    assert message.startswith("bind address 'web' is not allowed by the server (it allows 0.0.0.0,[::])")
    assert "--allow-bind" in message


@pytest.mark.parametrize(
    ("host", "expected"),
    [("web", True), ("db_1", True), ("localhost", False), ("0.0.0.0", False), ("::1", False), ("a.example", False)],
)
def test_looks_like_service_name(host: str, expected: bool) -> None:
    assert looks_like_service_name(host) is expected


def test_a_service_name_as_bind_address_is_warned_about() -> None:
    (warning,) = bind_name_warnings([RemoteSpec.parse("web:29002:127.0.0.1:80"), RemoteSpec.parse("9000:h:1")])
    assert warning.startswith("-R web:29002:127.0.0.1:80: the bind address 'web' looks like a service name")
    assert warning.endswith("write -R web=29002:127.0.0.1:80")


def test_reason_words() -> None:
    assert reason_word(ErrorCode.ADDRESS_IN_USE) == "address_in_use"
    assert reason_word(ErrorCode.PROHIBITED) == "prohibited"
    assert reason_word(4711) == "code_4711"
    assert can_heal(ErrorCode.ADDRESS_IN_USE) and not can_heal(ErrorCode.PROHIBITED)
    assert ErrorCode.ADDRESS_IN_USE == 22
    error = ServiceRefusedError("web", ErrorCode.PROHIBITED, "port 80 is not allowed")
    assert str(error) == (
        "the server refused the service web (prohibited: port 80 is not allowed); stopping (--exit-on-refusal)"
    )


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("tunnel.example.com", "tunnel.example.com", 7835), ("[::1]", "::1", 7835), ("h:99", "h", 99), ("99", "d", 99)],
)
def test_a_host_alone_takes_the_default_port(text: str, host: str, port: int) -> None:
    parsed = parse_hostport(text, default_host="d", default_port=DEFAULT_SERVER_PORT)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize(("text", "message"), [("h", "missing ':PORT'"), ("[::1]", "expected ':PORT' after ']'")])
def test_without_a_default_port_a_host_alone_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_hostport(text)


def test_toml_server_alone_takes_the_default_port(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[client]\nserver = "tunnel.example.com"\nexit_on_refusal = true\n[client.expose.web]\n'
        'local = "127.0.0.1:80"\nremote_port = 0\n'
    )
    config = ClientConfig.from_toml(path)
    assert (config.server.host, config.server.port) == ("tunnel.example.com", 7835)
    assert config.exit_on_refusal
    assert not ClientConfig.from_sources(config_file=path, exit_on_refusal=False).exit_on_refusal


def test_the_documented_address_in_use_reply_vector() -> None:
    """docs/PROTOCOL.md, section 9: the CTRL_REPLY refusing a port in use."""
    from trio_tunnel.proto.frames import CtrlReply, encode

    vector = "00 05 00 00 00 10 94 0b 00 01 16 81 a7 6d 65 73 73 61 67 65 a6 69 6e 20 75 73 65"
    assert encode(CtrlReply(1, ErrorCode.ADDRESS_IN_USE, {"message": "in use"})) == bytes.fromhex(vector)
    assert vector in (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text()


def test_the_command_line_takes_a_host_alone_and_the_new_flags() -> None:
    from trio_tunnel.cli import _plan
    from trio_tunnel.usage import build_parser

    parser = build_parser()
    args = parser.parse_args(["client", "--server", "tunnel.example.com", "-R", "9000:h:80", "--exit-on-refusal"])
    client = _plan(args, {"TRIO_TUNNEL_TOKEN": "0123456789abcdef0123"}).config
    assert isinstance(client, ClientConfig)
    assert (client.server.host, client.server.port, client.exit_on_refusal) == ("tunnel.example.com", 7835, True)
    args = parser.parse_args(["server", "--listen", "192.0.2.7", "--allow-bind", "192.0.2.7", "--allow-bind", "::1"])
    server = _plan(args, {"TRIO_TUNNEL_TOKEN": "0123456789abcdef0123"}).config
    assert isinstance(server, ServerConfig)
    assert (server.listen.host, server.listen.port) == ("192.0.2.7", 7835)
    assert server.allow_bind.hosts == ("192.0.2.7", "::1")
