"""UDP in the configuration: ``/udp`` on -R/-L specs, ``protocol = "udp"`` in TOML, and the server's port and
target lists, where a bare entry stays TCP only."""

from __future__ import annotations

from pathlib import Path

import pytest
from trio_tunnel.config import ClientConfig, LocalSpec, MapConfig, PortSet, RemoteSpec, ServerConfig, TargetAllowlist
from trio_tunnel.errors import ConfigError


def test_udp_suffix_on_specs() -> None:
    remote = RemoteSpec.parse("dns=5353:127.0.0.1:53/udp")
    assert (remote.protocol, remote.bind_port, remote.target_port, remote.idle_timeout) == ("udp", 5353, 53, 60.0)
    assert str(remote) == "dns=0.0.0.0:5353:127.0.0.1:53/udp"
    local = LocalSpec.parse("127.0.0.1:5353:[fd00::2]:53/UDP")
    assert (local.protocol, local.target_host, local.name) == ("udp", "fd00::2", "[fd00::2]:53-udp")
    assert RemoteSpec.parse("9000:127.0.0.1:80").protocol == "tcp"
    assert RemoteSpec.parse("9000:127.0.0.1:80/tcp").protocol == "tcp"


def test_same_port_for_tcp_and_udp_is_fine_but_not_twice_the_same() -> None:
    specs = [RemoteSpec.parse("a=53:127.0.0.1:53"), RemoteSpec.parse("b=53:127.0.0.1:53/udp")]
    RemoteSpec.check_unique(specs)
    with pytest.raises(ValueError, match=r"two -R services listen on 0\.0\.0\.0:53/udp"):
        RemoteSpec.check_unique([*specs, RemoteSpec.parse("c=53:127.0.0.1:54/udp")])


def test_bad_suffix_is_one_readable_error() -> None:
    with pytest.raises(ConfigError, match=r"invalid -R spec 'dns=5353:127.0.0.1:53/udpx'.*\[/udp\]"):
        RemoteSpec.parse("dns=5353:127.0.0.1:53/udpx")


def test_toml_protocol_and_idle_timeout(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[client]\nserver = "127.0.0.1:7835"\n'
        '[client.expose.dns]\nlocal = "127.0.0.1:53"\nremote_port = 5353\nprotocol = "udp"\nidle_timeout = 30\n'
        '[client.forward.ntp]\nlisten = "127.0.0.1:1123"\ntarget = "10.0.0.1:123"\nprotocol = "udp"\n'
    )
    config = ClientConfig.from_toml(path)
    assert [(s.name, s.protocol, s.idle_timeout) for s in config.remotes] == [("dns", "udp", 30.0)]
    assert [(s.name, s.protocol) for s in config.locals] == [("ntp", "udp")]
    path.write_text(
        '[client]\nserver = "127.0.0.1:7835"\n[client.expose.x]\nlocal = 53\nremote_port = 1\nprotocol = "sctp"\n'
    )
    with pytest.raises(ConfigError, match=r'protocol: expected "tcp" or "udp", got \'sctp\''):
        ClientConfig.from_toml(path)


def test_map_protocol(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[map]\nlisten = 5353\ntarget = "10.0.0.2:53"\nprotocol = "udp"\nidle_timeout = 5\n')
    config = MapConfig.from_toml(path)
    assert (config.protocol, config.idle_timeout) == ("udp", 5.0)


def test_allow_ports_bare_entries_are_tcp_only() -> None:
    ports = PortSet.parse("53/udp,8000-8999,5000-5010/udp")
    assert 53 not in ports and 8000 in ports
    assert 53 in ports.udp and 5005 in ports.udp and 8000 not in ports.udp
    assert str(ports) == "8000-8999,53/udp,5000-5010/udp"
    assert PortSet.parse(str(ports)) == ports
    # The default allows no UDP at all: nobody's UDP is opened by surprise.
    assert 0 not in PortSet().udp and 5353 not in PortSet().udp
    assert ServerConfig(tokens=(b"t",)).allow_ports.udp_ranges == ()
    with pytest.raises(ConfigError, match="reversed"):
        PortSet.parse("60-50/udp")


def test_allow_target_protocols() -> None:
    targets = TargetAllowlist.parse("10.0.0.0/8:53/udp,[fd00::/8]:53/udp,127.0.0.1:*,db.internal:5432")
    assert targets.allows("10.1.2.3", 53, "udp") and not targets.allows("10.1.2.3", 53)
    assert targets.allows("fd00::5", 53, "udp")
    assert targets.allows("127.0.0.1", 53) and not targets.allows("127.0.0.1", 53, "udp")
    assert str(targets) == "10.0.0.0/8:53/udp,[fd00::/8]:53/udp,127.0.0.1:*,db.internal:5432"
    assert TargetAllowlist.parse(str(targets)) == targets
