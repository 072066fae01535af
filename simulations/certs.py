"""``fedsocial certs`` and ``fedsocial keys``: the key material of a deployment.

``certs`` (the coordinator): a self-signed certificate authority and a SuperLink server certificate
signed by it, for ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem
--ssl-keyfile server.key``; partners verify the SuperLink with ``flower-supernode
--root-certificates ca.crt``.

``keys`` (each partner): the SuperNode authentication key pair in the form Flower 1.42 reads it
(an OpenSSH private key of a NIST curve, loaded by ``flower-supernode
--auth-supernode-private-key``; its OpenSSH public key is what ``flwr supernode register`` sends to
the SuperLink), and the partner's Ed25519 key that signs its privacy ledger.

Private keys are written with mode 0600; nothing here overwrites an existing file unless asked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsocial.shared import signing
from fedsocial.simulations.common import EXIT_USER_ERROR, user_errors


class KeyMaterialError(ValueError):
    """Bad arguments for certificate or key generation (names the argument)."""


CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODE_KEY = "supernode.key"  # OpenSSH EC private key: flower-supernode --auth-supernode-private-key
NODE_PUB = "supernode.key.pub"  # OpenSSH public key: flwr supernode register
LEDGER_KEY = "ledger_signing.key"
LEDGER_PUB = "ledger_signing.pub"


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class KeyPaths:
    node_key: Path
    node_pub: Path
    ledger_key: Path | None
    ledger_pub: Path | None


def parse_hosts(text: str) -> list[str]:
    """``"localhost,127.0.0.1"`` -> ``["localhost", "127.0.0.1"]``; empty names are an error."""
    hosts = [h.strip() for h in text.split(",")]
    if not text.strip() or any(not h for h in hosts):
        raise KeyMaterialError(f"--hosts {text!r}: expected NAME[,NAME...] with no empty names")
    return hosts


def compute_san(hosts: list[str]) -> x509.SubjectAlternativeName:
    """One SAN entry per host: an IP address where the name parses as one, else a DNS name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start, so the key is never readable by others."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _check_free(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise KeyMaterialError(f"refusing to overwrite {', '.join(existing)} (use --force)")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsocial"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def build_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed ECDSA P-256 CA certificate (basicConstraints CA, may sign certificates)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = _name("fedsocial deployment CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def build_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
                      days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SuperLink TLS server certificate for ``hosts`` (SANs), signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(compute_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_certs(out: str | os.PathLike[str], hosts: list[str], days: int = 365,
                force: bool = False) -> CertPaths:
    """Write ca.crt, ca.key (0600), server.pem and server.key (0600) into ``out``."""
    if days < 1:
        raise KeyMaterialError(f"--days {days}: must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    _check_free([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force)
    ca_key, ca_cert = build_ca(days)
    srv_key, srv_cert = build_server_cert(ca_key, ca_cert, hosts, days)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _key_pem(ca_key))
    paths.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _key_pem(srv_key))
    return paths


def compute_node_keypair() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line).

    Flower 1.42 reads the private key with ``load_ssh_private_key`` and requires an EC key; the
    public key must be an OpenSSH key of a NIST curve (``flwr supernode register``). P-384 is the
    curve Flower's own documentation and key helpers use.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def write_keys(partner: str, out: str | os.PathLike[str], force: bool = False,
               ledger: bool = True) -> KeyPaths:
    """Write the partner's SuperNode key pair and (``ledger``) its Ed25519 ledger-signing key pair."""
    if not partner or any(c in partner for c in "/\\ \t\n"):
        raise KeyMaterialError(f"--partner {partner!r}: must be a non-empty name without slashes or spaces")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    node_key, node_pub = out / NODE_KEY, out / NODE_PUB
    ledger_key, ledger_pub = (out / LEDGER_KEY, out / LEDGER_PUB) if ledger else (None, None)
    _check_free([p for p in (node_key, node_pub, ledger_key, ledger_pub) if p is not None], force)
    private, public = compute_node_keypair()
    _write_private(node_key, private)
    node_pub.write_bytes(public.rstrip(b"\n") + f" fedsocial-{partner}\n".encode())
    if ledger_key is not None and ledger_pub is not None:
        _write_ledger_keys(ledger_key, ledger_pub)
    return KeyPaths(node_key, node_pub, ledger_key, ledger_pub)


def _write_ledger_keys(key_path: Path, pub_path: Path) -> None:
    """The partner's Ed25519 ledger-signing key pair, in the format ``shared.signing`` reads."""
    private, public = signing.generate_keypair()
    signing.save_private_key(private, key_path, overwrite=True)
    signing.save_public_key(public, pub_path, overwrite=True)


def _certs_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsocial certs",
                                description="Make a CA and a SuperLink TLS server certificate signed by it.")
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--hosts", required=True,
                   help="comma-separated DNS names / IP addresses partners use to reach the SuperLink")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return p


def _keys_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsocial keys",
                                description="Make a partner's SuperNode authentication and ledger-signing keys.")
    p.add_argument("--partner", required=True, help="partner name (used in the key comment)")
    p.add_argument("--out", required=True, help="folder for the partner's key files")
    p.add_argument("--no-ledger-key", action="store_true", help="only the SuperNode key pair")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    return p


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return EXIT_USER_ERROR


@user_errors
def main_certs(argv: list[str] | None = None) -> int:
    """``fedsocial certs --out DIR --hosts NAME[,NAME...] [--days N] [--force]``."""
    args = _certs_parser().parse_args(argv)
    try:
        paths = write_certs(args.out, parse_hosts(args.hosts), days=args.days, force=args.force)
    except KeyMaterialError as exc:
        return _fail(exc)
    print(f"CA certificate:     {paths.ca_cert}  (give to every partner: --root-certificates)")
    print(f"CA key:             {paths.ca_key}  (keep offline)")
    print(f"SuperLink cert/key: {paths.server_cert}, {paths.server_key}")
    return 0


@user_errors
def main_keys(argv: list[str] | None = None) -> int:
    """``fedsocial keys --partner NAME --out DIR [--no-ledger-key] [--force]``."""
    args = _keys_parser().parse_args(argv)
    try:
        paths = write_keys(args.partner, args.out, force=args.force, ledger=not args.no_ledger_key)
    except KeyMaterialError as exc:
        return _fail(exc)
    print(f"SuperNode key:      {paths.node_key}  (flower-supernode --auth-supernode-private-key)")
    print(f"SuperNode pub key:  {paths.node_pub}  (send to the coordinator: flwr supernode register)")
    if paths.ledger_key is not None:
        print(f"Ledger signing key: {paths.ledger_key}  (node-config signing-key)")
        print(f"Ledger public key:  {paths.ledger_pub}  (for auditors: fedsocial audit --public-keys)")
    return 0
