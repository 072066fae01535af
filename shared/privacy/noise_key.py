"""A partner's DP noise secret: the key behind its Gaussian noise and Poisson samples (DP-SGD).

DP-SGD's guarantee needs noise nobody else can regenerate (Abadi et al. 2016). Seeding it from the shared
config would let the server replay and remove it, so each partner derives its seeds from its own secret
(shared/trainer.py ``compute_dp_seeds``), kept 0600 in its state folder and never sent.
"""

from __future__ import annotations

import os
from pathlib import Path

NOISE_KEY = "dp_noise.key"  # the partner's secret behind its DP noise and Poisson samples (0600)


def load_or_create_noise_key(state_dir: Path) -> bytes:
    """The partner's 32-byte DP noise secret, created from OS entropy on first use and never sent.

    It makes the partner's noise reproducible by the partner alone (shared/trainer.py compute_dp_seeds),
    where a seed from the shared config would let the server regenerate and remove it.
    """
    path = state_dir / NOISE_KEY
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path}: a DP noise key must be 32 bytes, found {len(key)}") from None
        return key
    key = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key
