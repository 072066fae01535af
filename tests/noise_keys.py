"""Give two runs the same DP noise secrets, so that a test may compare them bit for bit.

Each partner draws its DP noise from its own secret (``STATE_DIR/dp_noise.key``, client/state.py); two
run folders therefore differ unless their partners share keys, as a resumed run shares its own. The server's
noise has its own secret (``RUN/server/dp_noise.key``, server/strategy.py), shared here too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedsocial.shared.privacy.noise_key import NOISE_KEY


def share_noise_keys(partners: int, *runs: Path, label: str = "test") -> None:
    """Write one 32-byte key per partner (``partner-i``) into each run's partner folders, and one server key."""
    server_key = hashlib.sha256(f"{label}:server".encode()).digest()
    for run in runs:
        (run / "server").mkdir(parents=True, exist_ok=True)
        _write_key(run / "server" / NOISE_KEY, server_key)
    for i in range(partners):
        key = hashlib.sha256(f"{label}:{i}".encode()).digest()
        for run in runs:
            folder = run / "partners" / f"partner-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            _write_key(folder / NOISE_KEY, key)


def _write_key(path: Path, key: bytes) -> None:
    path.write_bytes(key)
    os.chmod(path, 0o600)
