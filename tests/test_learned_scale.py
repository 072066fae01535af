"""``model.learned_scale``: one shared scalar w multiplies the user-item term by exp(SCALE_RATE * w).

Known values (w = 0 is the plain model; any w scales exactly the user-item part of every score, in training,
evaluation and serving), the clamp, the parameter's place among the shared (federated, DP-trained)
parameters, and the property it exists for: when the learned term carries no signal, training lowers it and
the ranking falls back on the item biases (and the DP popularity prior). The per-example DP clipping of the
scalar is covered with every other model variant in tests/test_opacus_grads.py and tests/test_onepass.py
(case ``social-learned-scale-cosine-local``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedsocial.shared.batching import ExampleBuilder
from fedsocial.shared.config import Config, DataConfig, ModelConfig
from fedsocial.shared.models import build_model
from fedsocial.shared.models.social import SCALE_LIMIT, SCALE_RATE, SocialRec
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate


def _split():  # type: ignore[no-untyped-def]
    cfg = Config(data=DataConfig(n_users=60, n_items=50, interactions_per_user=8.0, friends_per_user=4.0))
    return split_dataset(generate(cfg.data), cfg.split)


def _pair(temperature: float = 0.2) -> tuple[SocialRec, SocialRec, ExampleBuilder]:
    """(plain model, the same with learned_scale and identical other parameters, example builder)."""
    split = _split()
    plain_cfg = ModelConfig(user_embedding="trained", temperature=temperature, loss="softmax", num_negatives=8)
    scaled_cfg = ModelConfig(user_embedding="trained", temperature=temperature, loss="softmax", num_negatives=8,
                             learned_scale=True)
    torch.manual_seed(0)
    plain = build_model(plain_cfg, split.n_users, split.n_items)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0.0, 0.3)
    scaled = build_model(scaled_cfg, split.n_users, split.n_items)
    missing, unexpected = scaled.load_state_dict(plain.state_dict(), strict=False)
    assert list(missing) == ["scale_emb.weight"] and not unexpected
    assert isinstance(plain, SocialRec) and isinstance(scaled, SocialRec)
    return plain, scaled, ExampleBuilder.from_split(split, scaled_cfg)


def test_zero_scale_is_the_plain_model_and_w_scales_the_user_item_term_exactly() -> None:
    # Prepare
    plain, scaled, builder = _pair()
    batch = builder.eval_batch(np.arange(10))
    train = builder.train_batch(np.arange(10), np.random.default_rng(0))
    bias = plain.item_biases()
    with torch.no_grad():
        # Execute / Assert: w = 0 (the initial value) gives the plain model's scores and loss
        assert float(scaled.scale_emb.weight) == 0.0  # type: ignore[union-attr]
        torch.testing.assert_close(scaled.full_sort_predict(batch), plain.full_sort_predict(batch))
        torch.testing.assert_close(scaled(train), plain(train))
        # any w: bias + exp(SCALE_RATE w) * (plain score - bias), for every user and item
        scaled.scale_emb.weight.fill_(0.3)  # type: ignore[union-attr]
        factor = math.exp(SCALE_RATE * 0.3)
        expected = bias + factor * (plain.full_sort_predict(batch) - bias)
        torch.testing.assert_close(scaled.full_sort_predict(batch), expected, rtol=1e-5, atol=1e-5)
        # training scores too: the per-example lookup equals the scalar used for scoring
        h, qv, cb = plain.target_user_vectors(train)
        pos_p, neg_p = plain.score_targets(h, qv, cb, train["targets"].shape[1])
        pos_s, neg_s = scaled.score_targets(h, qv, cb, train["targets"].shape[1], scaled.user_scale(train["users"]))
        n_pos = pos_p.shape[1]
        pos_bias, neg_bias = cb[:, :n_pos], cb[:, None, n_pos:]
        torch.testing.assert_close(pos_s - pos_bias, factor * (pos_p - pos_bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(neg_s - neg_bias, factor * (neg_p - neg_bias), rtol=1e-5, atol=1e-5)


def test_scale_is_clamped_whatever_w_becomes() -> None:
    # Prepare
    _, scaled, _ = _pair()
    for w, expected in ((100.0, math.exp(SCALE_LIMIT)), (-100.0, math.exp(-SCALE_LIMIT)), (0.5, math.exp(2.0))):
        with torch.no_grad():
            scaled.scale_emb.weight.fill_(w)  # type: ignore[union-attr]
        # Execute
        got = scaled.user_scale()
        # Assert
        assert got is not None and math.isclose(float(got.detach()), expected, rel_tol=1e-6)


def test_scale_is_a_shared_parameter_trained_like_the_others() -> None:
    # Prepare / Execute
    plain, scaled, _ = _pair()
    # Assert: federated (so DP-trained and averaged like every shared table), and absent from the plain model
    assert "scale_emb.weight" in scaled.shared_parameter_names()
    assert "scale_emb.weight" not in plain.shared_parameter_names()
    assert scaled.scale_emb is not None and scaled.scale_emb.weight.requires_grad  # type: ignore[union-attr]
    assert plain.user_scale() is None


def test_training_lowers_the_scale_when_the_user_item_term_is_noise() -> None:
    # Prepare: the user-item term is frozen random noise (every table fixed, large); only w and the item
    # biases train, on a sampled softmax over the real training data
    _, scaled, builder = _pair(temperature=0.2)
    for name, p in scaled.named_parameters():
        p.requires_grad_(name in ("scale_emb.weight", "item_bias.weight"))
    with torch.no_grad():
        scaled.item_bias.weight.zero_()
        scaled.scale_emb.weight.zero_()  # type: ignore[union-attr]
    opt = torch.optim.Adam([p for p in scaled.parameters() if p.requires_grad], lr=0.05)
    rng = np.random.default_rng(0)
    users = np.flatnonzero(np.diff(builder.item_indptr) > 0)
    # Execute
    for _ in range(60):
        opt.zero_grad()
        scaled(builder.train_batch(rng.choice(users, 32), rng)).mean().backward()
        opt.step()
    # Assert: the scale fell well below 1, so biases decide the ranking rather than the noise
    scale = scaled.user_scale()
    assert scale is not None and float(scale.detach()) < 0.5


def test_a_non_private_fit_keeps_the_scale_and_a_dp_fit_trains_it() -> None:
    # Prepare: the same tiny federation config, with learned_scale, w set away from 0
    import dataclasses

    from fedsocial.shared.trainer import LocalTrainer
    from tests.test_federation import tiny_config

    base = tiny_config()
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, learned_scale=True))
    split = split_dataset(generate(cfg.data), cfg.split)
    results = {}
    for private in (False, True):
        run_cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, enabled=private))
        trainer = LocalTrainer(run_cfg, split, seed=0)
        trainer.noise_key = b"k" * 32
        scale_emb = trainer.model.scale_emb
        assert scale_emb is not None
        with torch.no_grad():
            scale_emb.weight.fill_(0.1)
        # Execute
        trainer.fit(2, noise_multiplier=1.0 if private else None, rng_seed=1, refit=False)
        results[private] = (float(scale_emb.weight.detach()), scale_emb.weight.requires_grad)
    # Assert: without DP the loss only sharpens the scale (BENCHMARKS.md 10.2), so it is kept as it is (and
    # left trainable for the next DP fit); a DP fit trains it
    assert results[False] == (float(torch.tensor(0.1)), True)  # bit for bit (0.1 as float32)
    assert abs(results[True][0] - 0.1) > 1e-6 and results[True][1]
