"""Deployment key material: the certificate chain verifies and Flower 1.42 loads the keys we write."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedsocial.shared import signing
from fedsocial.simulations import certs


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_is_signed_by_ca_with_sans(tmp_path: Path) -> None:
    # Prepare / Execute
    paths = certs.write_certs(tmp_path, ["superlink.example.org", "localhost", "127.0.0.1"], days=30)
    ca, server = _load_cert(paths.ca_cert), _load_cert(paths.server_cert)

    # Assert: the chain verifies (signature by the CA key, issuer matches) and the CA is a CA
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    now = dt.datetime.now(dt.UTC)
    for cert in (ca, server):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert server.not_valid_after_utc - now < dt.timedelta(days=31)


def test_tls_stack_accepts_the_chain_for_the_listed_host_only(tmp_path: Path) -> None:
    # Prepare: what a TLS client does (Python's ssl, the same OpenSSL checks gRPC/httpx make)
    paths = certs.write_certs(tmp_path, ["localhost", "127.0.0.1"])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.server_cert, paths.server_key)  # key matches the certificate
    client_ctx = ssl.create_default_context(cafile=str(paths.ca_cert))

    # Execute: a TLS handshake in memory for a listed name and an unlisted one
    def handshake(hostname: str) -> None:
        c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        client.do_handshake()

    # Assert
    handshake("localhost")
    handshake("127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("other.example.org")


def test_private_keys_are_owner_only_and_not_overwritten(tmp_path: Path) -> None:
    # Prepare / Execute
    paths = certs.write_certs(tmp_path, ["localhost"])

    # Assert
    for key in (paths.server_key, paths.ca_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(certs.KeyMaterialError, match="refusing to overwrite"):
        certs.write_certs(tmp_path, ["localhost"])
    before = paths.server_cert.read_bytes()
    certs.write_certs(tmp_path, ["localhost"], force=True)
    assert paths.server_cert.read_bytes() != before


def test_node_keys_load_the_way_flower_loads_them(tmp_path: Path) -> None:
    # Prepare
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = certs.write_keys("acme", tmp_path)

    # Execute: flower-supernode's loader of --auth-supernode-private-key, and the loader
    # `flwr supernode register` applies to the public key file
    loaded = _try_setup_client_authentication(
        argparse.Namespace(auth_supernode_private_key=str(paths.node_key), auth_supernode_public_key=None))
    registered = try_load_public_key(paths.node_pub)

    # Assert: an EC key, and the public key the SuperLink registers is the private key's own
    assert loaded is not None
    private, public = loaded
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert registered == public_key_to_bytes(public)
    assert stat.S_IMODE(paths.node_key.stat().st_mode) == 0o600
    assert paths.node_pub.read_text().rstrip().endswith("fedsocial-acme")


def test_ledger_key_signs_and_verifies_with_shared_signing(tmp_path: Path) -> None:
    # Prepare
    paths = certs.write_keys("acme", tmp_path)
    assert paths.ledger_key is not None and paths.ledger_pub is not None

    # Execute
    signature = signing.sign(signing.load_private_key(paths.ledger_key), b"ledger entry")

    # Assert
    public = signing.load_public_key(paths.ledger_pub)
    assert signing.verify(public, b"ledger entry", signature)
    assert not signing.verify(public, b"ledger entry, edited", signature)
    assert stat.S_IMODE(paths.ledger_key.stat().st_mode) == 0o600


def test_two_partners_get_different_keys(tmp_path: Path) -> None:
    a = certs.write_keys("a", tmp_path / "a")
    b = certs.write_keys("b", tmp_path / "b")
    assert a.node_pub.read_text().split()[1] != b.node_pub.read_text().split()[1]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    rc_hosts = certs.main_certs(["--out", str(tmp_path), "--hosts", "a,,b"])
    err_hosts = capsys.readouterr().err
    rc_partner = certs.main_keys(["--partner", "a/b", "--out", str(tmp_path)])
    err_partner = capsys.readouterr().err

    # Assert
    assert rc_hosts == 2 and "--hosts" in err_hosts and "Traceback" not in err_hosts
    assert rc_partner == 2 and "--partner" in err_partner
    assert not (tmp_path / certs.CA_CERT).exists()


def test_cli_writes_the_files_flower_is_given(tmp_path: Path) -> None:
    assert certs.main_certs(["--out", str(tmp_path / "c"), "--hosts", "localhost,127.0.0.1"]) == 0
    assert certs.main_keys(["--partner", "p0", "--out", str(tmp_path / "k")]) == 0
    names = {p.name for p in (tmp_path / "c").iterdir()} | {p.name for p in (tmp_path / "k").iterdir()}
    assert {"ca.crt", "server.pem", "server.key", "supernode.key", "supernode.key.pub",
            "ledger_signing.key", "ledger_signing.pub"} <= names
