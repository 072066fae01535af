"""Give two runs the same DP noise secrets, so that a test may compare them bit for bit.

Each partner draws its DP noise from its own secret (``STATE_DIR/dp_noise.key``, client/state.py); two
run folders therefore differ unless their partners share keys, as a resumed run shares its own.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedsocial.shared.privacy.noise_key import NOISE_KEY


def share_noise_keys(partners: int, *runs: Path, label: str = "test") -> None:
    """Write one 32-byte key per partner (``partner-i``) into each run's partner folders."""
    for i in range(partners):
        key = hashlib.sha256(f"{label}:{i}".encode()).digest()
        for run in runs:
            folder = run / "partners" / f"partner-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / NOISE_KEY
            path.write_bytes(key)
            os.chmod(path, 0o600)
