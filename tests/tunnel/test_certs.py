"""The server identity on disk, key fingerprints and pins, and the SSL contexts: CA verification and pinning
through real TLS 1.3 handshakes on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import ssl
import stat
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tls_helpers import HOSTNAME, ca_contexts, handshake_pair, write_leaf
from trio_tunnel import certs
from trio_tunnel.errors import ConfigError
from trio_tunnel.tls import TlsHandshakeError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _reissue(cert_path: Path, key_path: Path, days: int = 1) -> bytes:
    """A new self-signed certificate (different serial, dates, name) for the key in ``key_path``, PEM."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "re-issued")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------------------------------- identity


def test_identity_is_made_once_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state" / "trio-tunnel"
    cert_path, key_path = certs.load_or_create_identity(state)
    assert _mode(state) == 0o700
    assert _mode(cert_path) == _mode(key_path) == 0o600
    first = certs.fingerprint_of_pem_file(cert_path)
    key_bytes, cert_bytes = key_path.read_bytes(), cert_path.read_bytes()
    assert certs.load_or_create_identity(state) == (cert_path, key_path)
    assert key_path.read_bytes() == key_bytes and cert_path.read_bytes() == cert_bytes
    assert certs.fingerprint_of_pem_file(cert_path) == first
    assert sorted(p.name for p in state.iterdir()) == sorted([certs.CERT_FILE, certs.KEY_FILE])  # no temp files

    cert = x509.load_pem_x509_certificate(cert_bytes)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "trio-tunnel"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=3600)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_lost_certificate_is_reissued_for_the_same_key(tmp_path: Path) -> None:
    cert_path, _key_path = certs.load_or_create_identity(tmp_path)
    pin = certs.fingerprint_of_pem_file(cert_path)
    cert_path.unlink()
    certs.load_or_create_identity(tmp_path)
    assert certs.fingerprint_of_pem_file(cert_path) == pin


def test_expiring_certificate_is_renewed_with_the_same_pin(tmp_path: Path) -> None:
    cert_path, key_path = certs.load_or_create_identity(tmp_path)
    pin = certs.fingerprint_of_pem_file(cert_path)
    cert_path.write_bytes(_reissue(cert_path, key_path, days=3))
    certs.load_or_create_identity(tmp_path)
    renewed = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert renewed.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3000)
    assert certs.fingerprint_of_pem_file(cert_path) == pin


def test_certificate_of_another_key_is_an_error(tmp_path: Path) -> None:
    cert_path, _ = certs.load_or_create_identity(tmp_path / "a")
    other_cert, _ = certs.load_or_create_identity(tmp_path / "b")
    cert_path.write_bytes(other_cert.read_bytes())
    with pytest.raises(ConfigError, match="does not belong to the key"):
        certs.load_or_create_identity(tmp_path / "a")


def test_unreadable_and_invalid_files_give_one_line_errors(tmp_path: Path) -> None:
    _cert_path, key_path = certs.load_or_create_identity(tmp_path)
    key_path.write_text("garbage\n")
    with pytest.raises(ConfigError) as info:
        certs.load_or_create_identity(tmp_path)
    assert str(key_path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        certs.fingerprint_of_pem_file(key_path)
    with pytest.raises(ConfigError, match=r"cannot read the certificate file .*missing\.pem"):
        certs.server_context(tmp_path / "missing.pem", key_path)
    with pytest.raises(ConfigError, match=r"cannot load|no PEM certificate"):
        certs.client_context(ca_file=key_path)


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd") + ":/elsewhere")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert certs.default_state_dir() == tmp_path / "systemd"
    monkeypatch.delenv("STATE_DIRECTORY")
    assert certs.default_state_dir() == tmp_path / "trio-tunnel"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    if os.geteuid() == 0:
        assert certs.default_state_dir() == Path("/var/lib/trio-tunnel")
    else:
        assert certs.default_state_dir() == Path.home() / ".local" / "state" / "trio-tunnel"


# ------------------------------------------------------------------------------------------------ fingerprints


def test_fingerprint_is_the_spki_hash_and_survives_reissue(tmp_path: Path) -> None:
    cert_path, key_path = certs.load_or_create_identity(tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode().rstrip("=")
    assert certs.fingerprint_of_pem_file(cert_path) == expected
    assert len(expected) == len("sha256:") + 43

    reissued = x509.load_pem_x509_certificate(_reissue(cert_path, key_path))
    assert reissued.serial_number != cert.serial_number
    assert certs.fingerprint(reissued.public_bytes(serialization.Encoding.DER)) == expected


def test_parse_fingerprint() -> None:
    digest = bytes(range(32))
    text = "sha256:" + base64.b64encode(digest).decode().rstrip("=")
    assert certs.parse_fingerprint(text) == digest
    assert certs.parse_fingerprint(text + "=") == digest  # padding tolerated
    assert certs.parse_fingerprint("SHA256:" + text[7:]) == digest
    with pytest.raises(ValueError, match="must start with 'sha256:'"):
        certs.parse_fingerprint(text[7:])
    with pytest.raises(ValueError, match="not valid base64"):
        certs.parse_fingerprint("sha256:!!!")
    with pytest.raises(ValueError, match="has 24 bytes"):
        certs.parse_fingerprint("sha256:" + base64.b64encode(bytes(24)).decode())


def test_check_pin(tmp_path: Path) -> None:
    cert_path, _ = certs.load_or_create_identity(tmp_path / "a")
    other_path, _ = certs.load_or_create_identity(tmp_path / "b")
    der = certs.load_certificate_der(cert_path)
    presented = certs.fingerprint_of_pem_file(cert_path)
    certs.check_pin(der, [certs.fingerprint_of_pem_file(other_path), presented])
    with pytest.raises(certs.PinMismatchError) as info:
        certs.check_pin(der, [certs.fingerprint_of_pem_file(other_path)])
    assert presented in str(info.value)
    assert info.value.presented == presented
    assert isinstance(info.value, ssl.SSLCertVerificationError)
    with pytest.raises(certs.PinMismatchError):
        certs.check_pin(None, [presented])


# ----------------------------------------------------------------------------------------------- handshakes


@pytest.mark.trio
async def test_pinned_self_signed_identity(tmp_path: Path) -> None:
    cert_path, key_path = certs.load_or_create_identity(tmp_path / "state")
    pin = certs.fingerprint_of_pem_file(cert_path)
    client_ctx = certs.client_context(pins=[pin])
    with trio.fail_after(10):
        client, server = await handshake_pair(certs.server_context(cert_path, key_path), client_ctx, hostname=None)
        async with client, server:
            assert client.version == "TLSv1.3"
            certs.check_pin(client.peer_certificate_der(), [pin])
            wrong = "sha256:" + base64.b64encode(bytes(32)).decode().rstrip("=")
            with pytest.raises(certs.PinMismatchError, match=pin.replace("+", r"\+")):
                certs.check_pin(client.peer_certificate_der(), [wrong])


@pytest.mark.trio
async def test_ca_verification_accepts_a_good_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    with trio.fail_after(10):
        client, server = await handshake_pair(*ca_contexts(tmp_path, ca, ca.issue_cert(HOSTNAME)))
        async with client, server:
            await client.send_all(b"ok")
            assert await server.receive_some() == b"ok"


async def _expect_client_rejects(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str, match: str
) -> None:
    with trio.fail_after(10), pytest.raises(ExceptionGroup) as info:
        await handshake_pair(server_ctx, client_ctx, hostname=hostname)
    client_errors = [e for e in info.value.exceptions if isinstance(e, TlsHandshakeError) and "verify" in str(e)]
    assert client_errors, info.value.exceptions
    assert match in str(client_errors[0])
    assert isinstance(client_errors[0].__cause__, ssl.SSLCertVerificationError)


@pytest.mark.trio
async def test_ca_verification_rejects_a_wrong_hostname(tmp_path: Path) -> None:
    ca = trustme.CA()
    await _expect_client_rejects(*ca_contexts(tmp_path, ca, ca.issue_cert(HOSTNAME)), "other.test", "Hostname mismatch")


@pytest.mark.trio
async def test_ca_verification_rejects_an_expired_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        HOSTNAME, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    await _expect_client_rejects(*ca_contexts(tmp_path, ca, leaf), HOSTNAME, "expired")


@pytest.mark.trio
async def test_ca_verification_rejects_another_ca(tmp_path: Path) -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    server_ctx, _ = ca_contexts(tmp_path, stranger, stranger.issue_cert(HOSTNAME))
    _, client_ctx = ca_contexts(tmp_path / "..", ca, ca.issue_cert(HOSTNAME))
    await _expect_client_rejects(server_ctx, client_ctx, HOSTNAME, "unable to get local issuer")


def test_server_context_accepts_a_chain_and_is_tls13_only(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.create_child_ca().issue_cert(HOSTNAME)
    assert len(leaf.cert_chain_pems) == 2
    cert_path, key_path = write_leaf(tmp_path, leaf)
    context = certs.server_context(cert_path, key_path)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert certs.client_context(pins=[certs.fingerprint_of_pem_file(cert_path)]).verify_mode == ssl.CERT_NONE
    client = certs.client_context()
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    with pytest.raises(ValueError, match="must start with"):
        certs.client_context(pins=["nope"])
    _, other_key = write_leaf(tmp_path, ca.issue_cert("x.test"), name="other")
    with pytest.raises(ConfigError, match="check that the key belongs"):
        certs.server_context(cert_path, other_key)
