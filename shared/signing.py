"""Ed25519 helpers (``cryptography``): key pairs, PEM files, signatures, fingerprints.

A partner signs every privacy-ledger entry with its private key; an auditor verifies with the public
key (preferably a trusted copy obtained out of band). Private keys are written with mode 0600.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key (the message names the file)."""


def generate_keypair() -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    private = Ed25519PrivateKey.generate()
    return private, private.public_key()


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_file(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write via a temporary file created with ``mode`` (never world-readable in between), then rename."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SigningError(f"{path}: already exists (refusing to overwrite a key)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have cleared bits; make the mode exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def save_private_key(private_key: Ed25519PrivateKey, path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """PEM (PKCS#8, unencrypted: protect the file), file mode 0600."""
    _write_file(Path(path), private_key_pem(private_key), 0o600, overwrite)


def save_public_key(public_key: Ed25519PublicKey, path: str | os.PathLike[str], overwrite: bool = True) -> None:
    _write_file(Path(path), public_key_pem(public_key), 0o644, overwrite)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"{path}: cannot read an Ed25519 private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"{path}: cannot read an Ed25519 public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path}: not an Ed25519 public key")
    return key


def load_or_create_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str] | None = None
) -> Ed25519PrivateKey:
    """Load the private key at ``private_path``, creating it on first use; (re)write its public PEM at
    ``public_path`` when missing or different."""
    private_path = Path(private_path)
    if private_path.exists():
        key = load_private_key(private_path)
    else:
        key, _ = generate_keypair()
        save_private_key(key, private_path)
    if public_path is not None:
        pem = public_key_pem(key.public_key())
        existing = Path(public_path).read_bytes() if Path(public_path).exists() else None
        if existing != pem:  # a stale public key from another private key would fail every audit
            save_public_key(key.public_key(), public_path)
    return key


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``data`` under ``public_key``."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the 32 raw public-key bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()
