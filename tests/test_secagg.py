"""SecAgg+ settings: derived from the federation config, validated, and accurate through Flower's quantiser."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.server.workflow import SecAggPlusWorkflow

from fedsocial.server.secagg import compute_quantization_error, derive_secagg_settings
from fedsocial.shared.config import Config, ConfigError, config_from_dict


def _cfg(**sections: dict[str, object]) -> Config:
    return config_from_dict({k: dict(v) for k, v in sections.items()})


def _flower_secagg_mean(updates: list[np.ndarray], weights: list[int], s: dict[str, float]) -> np.ndarray:
    """What SecAgg+ reconstructs: the clients' steps of ``secaggplus_mod`` and the server's unmasking
    arithmetic of ``SecAggPlusWorkflow`` with Flower's own functions (the masks cancel in the sum)."""
    q_range, c_range = int(s["quantization_range"]), float(s["clipping_range"])
    total: list[np.ndarray] | None = None
    for x, w in zip(updates, weights, strict=True):
        q_ratio = round(w / s["max_weight"] * q_range)
        vec = factor_combine(q_ratio, quantize(parameters_multiply([x], q_ratio / q_range), c_range, q_range))
        vec = [a.astype(np.int64) for a in vec]
        total = vec if total is None else [a + b for a, b in zip(total, vec, strict=True)]
    assert total is not None
    q_total, summed = factor_extract(parameters_mod(total, int(s["modulus_range"])))
    mean = dequantize(summed, c_range, q_range)[0]
    return (mean - (len(updates) - 1) * c_range) * (q_range / q_total)


def _clipped_updates(rng: np.random.Generator, n: int, dim: int, clipping_norm: float) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        x = rng.normal(size=dim)
        x[0] = 50.0  # one large coordinate: after clipping it is close to +-clipping_norm
        out.append(x * clipping_norm / np.linalg.norm(x))
    return out


def test_derived_settings_follow_clipping_norm_and_capped_weights() -> None:
    # Prepare
    cfg = _cfg(federation={"partners": 3, "clipping_norm": 2.5, "weight_cap": 300, "min_partners": 2})

    # Execute
    s = derive_secagg_settings(cfg, weights=[120, 450, 80])

    # Assert: a clipped update's coordinates fit, the cap bounds the largest weight, Flower accepts it
    assert s["clipping_range"] == 2.5
    assert s["max_weight"] == 300.0
    assert (s["num_shares"], s["reconstruction_threshold"]) == (3, 2)
    SecAggPlusWorkflow(**s)


def test_max_weight_without_user_counts() -> None:
    assert derive_secagg_settings(_cfg(federation={"weight_cap": 40}))["max_weight"] == 40.0
    assert derive_secagg_settings(_cfg(data={"n_users": 90}))["max_weight"] == 90.0
    with pytest.raises(ConfigError, match="secagg.max_weight"):
        derive_secagg_settings(_cfg(data={"format": "lastfm", "path": "lastfm"}))


def test_flower_aggregate_matches_weighted_mean_within_the_bound() -> None:
    # Prepare
    cfg = _cfg(federation={"partners": 3, "clipping_norm": 1.0, "min_partners": 2})
    weights = [40, 200, 90]
    s = derive_secagg_settings(cfg, weights=weights)
    updates = _clipped_updates(np.random.default_rng(0), 3, 500, 1.0)

    # Execute
    got = _flower_secagg_mean(updates, weights, s)

    # Assert
    exact = np.average(np.stack(updates), axis=0, weights=weights)
    bound = compute_quantization_error(s["clipping_range"], 1.0, s["quantization_range"], s["max_weight"],
                                       float(np.mean(weights)))
    assert np.max(np.abs(got - exact)) <= bound
    assert np.max(np.abs(got - exact)) <= cfg.secagg.precision * 1.0


def test_a_clipping_range_below_the_clipping_norm_is_refused_and_would_bias() -> None:
    # Prepare
    cfg = _cfg(federation={"clipping_norm": 1.0}, secagg={"clipping_range": 0.25})
    updates = _clipped_updates(np.random.default_rng(1), 3, 50, 1.0)
    good = derive_secagg_settings(_cfg(federation={"clipping_norm": 1.0}), weights=[10, 10, 10])

    # Execute / Assert: refused; and what it would have done to a clipped update's large coordinate
    with pytest.raises(ConfigError, match="secagg.clipping_range"):
        derive_secagg_settings(cfg, weights=[10, 10, 10])
    biased = _flower_secagg_mean(updates, [10, 10, 10], {**good, "clipping_range": 0.25})
    assert abs(biased[0] - np.mean([u[0] for u in updates])) > 0.5


def test_a_max_weight_below_a_partner_weight_is_refused() -> None:
    cfg = _cfg(federation={"weight_cap": 500}, secagg={"max_weight": 100.0})
    with pytest.raises(ConfigError, match="secagg.max_weight"):
        derive_secagg_settings(cfg, weights=[50, 400, 300])
    assert derive_secagg_settings(cfg, weights=[50, 100, 30])["max_weight"] == 100.0


@pytest.mark.parametrize(("secagg", "federation", "key"), [
    ({"num_shares": 3, "reconstruction_threshold": 3}, {}, "secagg.reconstruction_threshold"),
    ({"num_shares": 2, "reconstruction_threshold": 2}, {}, "secagg.num_shares"),
    ({"num_shares": 5, "reconstruction_threshold": 3}, {"partners": 3}, "secagg.num_shares"),
    ({"num_shares": 5, "reconstruction_threshold": 2}, {"partners": 5}, "secagg.reconstruction_threshold"),
    ({"num_shares": 5, "reconstruction_threshold": 4}, {"partners": 5, "min_partners": 2},
     "secagg.reconstruction_threshold"),
    ({"quantization_range": 2**31}, {}, "secagg.quantization_range"),
    ({"quantization_range": 1000}, {}, "secagg.quantization_range"),
])
def test_inconsistent_settings_name_the_key(secagg: dict[str, object], federation: dict[str, object],
                                            key: str) -> None:
    cfg = _cfg(secagg=secagg, federation=federation)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        derive_secagg_settings(cfg, weights=[100] * cfg.federation.partners)


def test_a_coarse_quantiser_misses_the_precision_it_is_refused_for() -> None:
    # Prepare: 1000 levels over [-1, 1] is a step of 2e-3, far above precision 1e-4
    cfg = _cfg(federation={"clipping_norm": 1.0}, secagg={"quantization_range": 1000})
    accepted = derive_secagg_settings(_cfg(federation={"clipping_norm": 1.0}), weights=[10, 10, 10])
    updates = _clipped_updates(np.random.default_rng(2), 3, 2000, 1.0)

    # Execute
    coarse = _flower_secagg_mean(updates, [10, 10, 10], {**accepted, "quantization_range": 1000})

    # Assert: the error the check predicts is real, and the config is refused for it
    assert np.max(np.abs(coarse - np.mean(np.stack(updates), axis=0))) > 1e-4
    with pytest.raises(ConfigError, match="secagg.quantization_range"):
        derive_secagg_settings(cfg, weights=[10, 10, 10])


def test_quorum_dropouts_are_tolerated_by_the_default_settings() -> None:
    # 3 partners, quorum 2: one partner may drop and its shares are still recoverable
    s = derive_secagg_settings(Config(), weights=[100, 100, 100])
    assert s["num_shares"] - (3 - 2) >= s["reconstruction_threshold"]
