"""The link's TLS settings in config files and flags: paths relative to the file, pins checked on load, and the
contradictions refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from trio_tunnel.config import ClientConfig, HostPort, RemoteSpec, ServerConfig
from trio_tunnel.errors import ConfigError

PIN = "sha256:" + "A" * 43
PIN2 = "sha256:" + "B" * 43
TOKEN = b"0123456789abcdef"


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunnel.toml"
    path.write_text(text)
    return path


def test_server_tls_paths_are_relative_to_the_file_and_default_to_tls(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        '[server]\ntoken = "0123456789abcdef"\ntls_cert = "c.pem"\ntls_key = "k.pem"\nstate_dir = "~/st"\n',
    )
    server = ServerConfig.from_toml(path)
    assert server.tls_cert == str(tmp_path / "c.pem") and server.tls_key == str(tmp_path / "k.pem")
    assert server.state_dir == str(Path("~/st").expanduser())
    assert server.insecure_plaintext is False
    assert ServerConfig.from_sources(tokens=[TOKEN]).tls_cert is None  # the server's own identity


def test_server_cert_without_key_and_plaintext_with_cert_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key go together"):
        ServerConfig.from_sources(tokens=[TOKEN], tls_cert="c.pem")
    with pytest.raises(ConfigError, match="--insecure-plaintext turns TLS off"):
        ServerConfig.from_sources(tokens=[TOKEN], tls_cert="c.pem", tls_key="k.pem", insecure_plaintext=True)
    path = _file(tmp_path, '[server]\ntoken = "0123456789abcdef"\ntls_cert = 5\n')
    with pytest.raises(ConfigError, match=r"tunnel.toml: server.tls_cert: expected a path"):
        ServerConfig.from_toml(path)


def test_client_fingerprint_string_or_list_and_flags(tmp_path: Path) -> None:
    one = _file(tmp_path, f'[client]\nserver = "127.0.0.1:7835"\nserver_fingerprint = "{PIN}"\n')
    assert ClientConfig.from_sources(
        config_file=one, remotes=[RemoteSpec.parse("0:127.0.0.1:80")]
    ).server_fingerprint == (PIN,)
    two = _file(tmp_path, f'[client]\nserver = "127.0.0.1:7835"\nserver_fingerprint = ["{PIN}", "{PIN2}", "{PIN}"]\n')
    config = ClientConfig.from_sources(config_file=two, remotes=[RemoteSpec.parse("0:127.0.0.1:80")])
    assert config.server_fingerprint == (PIN, PIN2)
    flags = ClientConfig.from_sources(
        config_file=two, server_fingerprint=[PIN2], remotes=[RemoteSpec.parse("0:127.0.0.1:80")]
    )
    assert flags.server_fingerprint == (PIN2,)  # the flag replaces the file's pins


def test_client_bad_fingerprint_and_contradictions_are_refused(tmp_path: Path) -> None:
    server = HostPort(host="127.0.0.1", port=7835)
    remotes = [RemoteSpec.parse("0:127.0.0.1:80")]
    with pytest.raises(ConfigError, match="--server-fingerprint: "):
        ClientConfig.from_sources(server=server, remotes=remotes, server_fingerprint=["md5:abc"])
    bad = _file(tmp_path, '[client]\nserver = "127.0.0.1:7835"\nserver_fingerprint = "nope"\n')
    with pytest.raises(ConfigError, match=r"tunnel.toml: client.server_fingerprint: "):
        ClientConfig.from_sources(config_file=bad, remotes=remotes)
    with pytest.raises(ConfigError, match="--insecure-plaintext turns TLS off"):
        ClientConfig.from_sources(server=server, remotes=remotes, server_fingerprint=[PIN], insecure_plaintext=True)
    ca = _file(tmp_path, '[client]\nserver = "127.0.0.1:7835"\ntls_ca = "ca.pem"\ninsecure_plaintext = true\n')
    with pytest.raises(ConfigError, match="--insecure-plaintext turns TLS off"):
        ClientConfig.from_sources(config_file=ca, remotes=remotes)
