"""The operations keys: proxy_protocol, group and balance on a service (TOML and -R NAME@GROUP=), the server's
accept_proxy_protocol/proxy_protocol_from/allow_groups, and the CLI's --proxy-protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
from trio_tunnel.config import ClientConfig, RemoteSpec
from trio_tunnel.errors import ConfigError
from trio_tunnel.usage import build_parser


def test_remote_spec_with_a_group() -> None:
    spec = RemoteSpec.parse("web@pool=9000:127.0.0.1:80")
    assert (spec.name, spec.group, spec.balance, spec.proxy_protocol) == ("web", "pool", "round-robin", None)
    assert str(spec) == "web@pool=0.0.0.0:9000:127.0.0.1:80"
    assert RemoteSpec.parse("@pool=9000:127.0.0.1:80").name == "127.0.0.1:80"  # the default name
    assert RemoteSpec.parse("web=9000:127.0.0.1:80", proxy_protocol="v2").proxy_protocol == "v2"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("web@=9000:127.0.0.1:80", "group name '' must be 1-64 characters"),
        ("web@a b=9000:127.0.0.1:80", "group name 'a b' must be"),
        ("web@a@b=9000:127.0.0.1:80", "group name 'a@b' must be"),
    ],
)
def test_bad_groups_are_one_readable_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        RemoteSpec.parse(text)


def test_balance_needs_a_group() -> None:
    with pytest.raises(ConfigError, match="balance 'least-connections' needs a group"):
        RemoteSpec.parse("web=9000:127.0.0.1:80", balance="least-connections")


def test_two_services_of_one_group_may_share_their_port() -> None:
    same = (RemoteSpec.parse("a@g=9000:127.0.0.1:80"), RemoteSpec.parse("b@g=9000:127.0.0.1:81"))
    RemoteSpec.check_unique(same)
    with pytest.raises(ValueError, match=r"two -R services listen on 0\.0\.0\.0:9000"):
        RemoteSpec.check_unique((RemoteSpec.parse("a=9000:127.0.0.1:80"), RemoteSpec.parse("b=9000:127.0.0.1:81")))


def test_toml_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[client]\nserver = "127.0.0.1:7835"\n[client.expose.web]\nlocal = "127.0.0.1:80"\nremote_port = 9000\n'
        'proxy_protocol = "v2"\ngroup = "pool"\nbalance = "least-connections"\n'
    )
    (spec,) = ClientConfig.from_toml(path).remotes
    assert (spec.proxy_protocol, spec.group, spec.balance) == ("v2", "pool", "least-connections")
    path.write_text(
        '[client]\nserver = "127.0.0.1:7835"\n[client.expose.web]\nlocal = "80"\nremote_port = 9000\n'
        'proxy_protocol = "v3"\n'
    )
    with pytest.raises(ConfigError, match=r'client\.expose\.web\.proxy_protocol: expected "v1" or "v2"'):
        ClientConfig.from_toml(path)


def test_cli_flag_choices() -> None:
    args = build_parser().parse_args(["client", "--proxy-protocol", "v1", "-R", "9000:127.0.0.1:80"])
    assert args.proxy_protocol == "v1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["client", "--proxy-protocol", "v3"])
