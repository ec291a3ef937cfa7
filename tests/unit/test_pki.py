"""The per-run PKI: a CA and a server certificate that real TLS 1.3 stacks accept for the SNI
and only for it."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.verification import PolicyBuilder, Store

from testbed.runtime.pki import Pki, make_pki

SNI = "www.testbed.example"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), SNI)


def _certs(pki: Pki) -> tuple[x509.Certificate, x509.Certificate]:
    return (x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()),
            x509.load_pem_x509_certificate(pki.server_cert.read_bytes()))


def _handshake(pki: Pki, server_hostname: str) -> tuple[str | None, str | None]:
    """A TLS handshake over memory BIOs; returns (version, cipher) or raises ssl.SSLError."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sctx.load_cert_chain(pki.server_cert, pki.server_key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cctx.load_verify_locations(cafile=pki.ca_cert)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = sctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "handshake did not complete"
    cipher = client.cipher()
    return client.version(), cipher[0] if cipher else None


def test_files_and_key_mode(pki: Pki) -> None:
    for path in (pki.ca_cert, pki.server_cert, pki.server_key):
        assert path.is_file() and path.stat().st_size > 0
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600
    # The CA's private key is not kept anywhere next to the certificates.
    assert sorted(p.name for p in pki.ca_cert.parent.iterdir()) == [
        "ca.pem", "server.key", "server.pem"]


def test_keys_are_p256_and_match(pki: Pki) -> None:
    ca, server = _certs(pki)
    key = load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    ca_pub = ca.public_key()
    assert isinstance(ca_pub, ec.EllipticCurvePublicKey)
    assert isinstance(ca_pub.curve, ec.SECP256R1)


def test_server_cert_profile(pki: Pki) -> None:
    ca, server = _certs(pki)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [SNI]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(hours=1) < lifetime <= dt.timedelta(days=1, minutes=10)
    now = dt.datetime.now(dt.UTC)
    assert server.not_valid_before_utc <= now <= server.not_valid_after_utc


def test_chain_verifies_for_sni(pki: Pki) -> None:
    ca, server = _certs(pki)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(SNI))
    chain = verifier.verify(server, [])
    assert chain[-1] == ca


def test_tls13_handshake_accepts_the_sni(pki: Pki) -> None:
    version, cipher = _handshake(pki, SNI)
    assert version == "TLSv1.3"
    assert cipher


def test_tls13_handshake_rejects_another_name(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "other.testbed.example")


def test_each_run_gets_its_own_ca(tmp_path: Path, pki: Pki) -> None:
    other = make_pki(tmp_path, SNI)
    assert other.ca_cert.read_bytes() != pki.ca_cert.read_bytes()
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(Pki(other.ca_cert, pki.server_cert, pki.server_key), SNI)


def test_ip_sni_gets_an_ip_san(tmp_path: Path) -> None:
    p = make_pki(tmp_path, "198.51.100.2")
    server = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.51.100.2")]


@pytest.mark.parametrize("bad", ["", "a b", "x\ny", "a" * 254])
def test_unusable_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        make_pki(tmp_path, bad)
