"""DP noise a server cannot regenerate: seeds come from the partner's secret, never from the config alone.

A seed derived from the (public) config let anyone holding the config replay a partner's Gaussian noise
and Poisson samples, and so remove the noise from its update; regression tests for that flaw.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest

from fedsocial.client.partner import Partner, settings_from_context
from fedsocial.client.state import NOISE_KEY, load_or_create_noise_key
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer, compute_dp_seeds
from fedsocial.simulations.simulate import write_config
from tests.test_federation import tiny_config


def test_dp_seeds_depend_on_the_secret_not_only_on_the_public_seed() -> None:
    # Execute
    a, b = compute_dp_seeds(7, b"k" * 32), compute_dp_seeds(7, b"k" * 32)
    other = compute_dp_seeds(7, b"j" * 32)
    fresh = {compute_dp_seeds(7, None) for _ in range(5)}
    # Assert
    assert a == b and a != other and a[0] != a[1]
    assert len(fresh) == 5  # no key: OS entropy, never a function of the seed
    assert all(0 <= s < 2**63 for pair in (a, other, *fresh) for s in pair)


def _dp_fit(key: bytes | None) -> list[np.ndarray]:
    cfg = tiny_config()
    split = split_dataset(generate(cfg.data), cfg.split)
    trainer = LocalTrainer(cfg, split, seed=3)
    trainer.noise_key = key
    trainer.fit(1, noise_multiplier=1.0, rng_seed=11)
    return [v.copy() for v in trainer.get_shared().values()]


def test_the_same_public_seed_without_the_secret_gives_other_noise() -> None:
    # Execute
    keyed = [_dp_fit(b"s" * 32) for _ in range(2)]
    unkeyed = [_dp_fit(None) for _ in range(2)]
    # Assert: reproducible only with the partner's key
    for x, y in zip(*keyed, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(*unkeyed, strict=True))


def test_a_partner_keeps_its_noise_key_private_and_reuses_it(tmp_path: Path) -> None:
    # Prepare
    config = write_config(tiny_config(), tmp_path / "run")
    settings = settings_from_context({"config-path": str(config), "run-dir": str(tmp_path / "run")},
                                     {"partition-id": 1, "num-partitions": 3})
    # Execute
    first = Partner(settings).new_trainer().noise_key
    again = Partner(settings).new_trainer().noise_key
    # Assert
    path = settings.state_dir / NOISE_KEY
    assert first is not None and first == again == path.read_bytes() and len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_damaged_noise_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / NOISE_KEY).write_bytes(b"short")
    with pytest.raises(ValueError, match=f"{NOISE_KEY}: a DP noise key must be 32 bytes, found 5"):
        load_or_create_noise_key(tmp_path)
