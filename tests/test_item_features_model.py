"""Price bins and text features in the model: shared vectors like categories, exact per-user clipping."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from fedsocial.shared.batching import ExampleBuilder
from fedsocial.shared.config import Config, DataConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedsocial.shared.data import SplitData
from fedsocial.shared.features import compute_price_bins
from fedsocial.shared.models import ModelError, build_model
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer, PerUserLoss

MCFG = ModelConfig(dim=8, mlp_hidden=8, use_price=True, use_text=True, user_embedding="none", max_targets=8,
                   num_negatives=4, max_history=16)


def _split(seed: int = 0) -> SplitData:
    cfg = DataConfig(n_users=40, n_items=60, interactions_per_user=8.0, friends_per_user=4.0)
    ds = generate(cfg)
    rng = np.random.default_rng(seed)
    ds = dataclasses.replace(ds, item_price_bin=compute_price_bins(rng.lognormal(size=ds.n_items), 4),
                             item_text=rng.normal(size=(ds.n_items, 5)).astype(np.float32))
    return split_dataset(ds, Config().split)


def _model(split: SplitData, mcfg: ModelConfig = MCFG) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(mcfg, split.n_users, split.n_items, item_price_bin=split.dataset.item_price_bin,
                        item_text=split.dataset.item_text)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model



def compute_brute_force_clipped_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                                    clip: float) -> dict[str, torch.Tensor]:
    """sum_b min(1, C / ||g_b||) g_b over the batch's users, one backward per user (the reference)."""
    brute = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(batch["users"].shape[0]):
        model.zero_grad()
        model({k: v[i:i + 1] for k, v in batch.items()}).sum().backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        for n in brute:
            brute[n] += (clip / (norm + 1e-6)).clamp(max=1.0) * grads[n]
    return brute


def compute_ghost_clipped_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                              clip: float) -> dict[str, torch.Tensor]:
    """The same clipped sum from Opacus's ghost clipping (no noise), by parameter name."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(40)), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, crit, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=PerUserLoss(),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode="ghost")
    opt.zero_grad()
    crit(gsm(batch), None).backward()
    ghost = {n.removeprefix("_module."): p.grad.clone() for n, p in gsm.named_parameters() if p.grad is not None}
    gsm._close()
    return ghost

def test_price_and_text_parameters_are_shared_and_scored_in_full_ranking() -> None:
    # Prepare
    split = _split()
    model = _model(split)
    # Execute
    names = model.shared_parameter_names()
    items = torch.arange(split.n_items)
    q = model._item_vectors(items)
    manual = (model.item_emb.weight + model.price_emb.weight[torch.as_tensor(split.dataset.item_price_bin)]
              + torch.as_tensor(split.dataset.item_text) @ model.text_proj.weight.T)
    # Assert: the item vector is q_i + g_price(i) + W t_i, and these tables are federated (shared)
    assert torch.allclose(q, manual, atol=1e-6)
    assert {"price_emb.weight", "hist_price_emb.weight", "text_proj.weight"} <= set(names)
    assert "item_text" not in names and "item_price" not in names  # fixed inputs, not parameters


def test_items_in_one_price_bin_share_its_vector() -> None:
    # Prepare
    split = _split()
    model = _model(split)
    bins = split.dataset.item_price_bin
    a, b = np.flatnonzero(bins == bins[0])[:2]
    # Execute
    with torch.no_grad():
        model.price_emb.weight[int(bins[0])] += 1.0
    # Assert: both items of that bin moved by the same vector, another bin's item did not
    other = int(np.flatnonzero(bins != bins[0])[0])
    delta = model._item_vectors(torch.tensor([a, b, other])) - (
        model.item_emb.weight[[a, b, other]] + model.text_proj(model.item_text[[a, b, other]])
        + model.price_emb.weight[torch.as_tensor(bins[[a, b, other]])])
    assert torch.allclose(delta, torch.zeros_like(delta), atol=1e-6)
    assert model.price_emb.weight[int(bins[0])].abs().min() > 0.5


@pytest.mark.parametrize(("flag", "missing"), [("use_price", "item_price_bin"), ("use_text", "item_text")])
def test_feature_flag_without_the_feature_is_refused(flag: str, missing: str) -> None:
    # Prepare
    split = _split()
    kwargs = {"item_price_bin": split.dataset.item_price_bin, "item_text": split.dataset.item_text}
    kwargs[missing] = None
    # Execute / Assert
    with pytest.raises(ModelError, match=f"model.{flag}"):
        build_model(ModelConfig(dim=8, **{flag: True}), split.n_users, split.n_items, **kwargs)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_ghost_clipping_matches_brute_force_with_price_and_text() -> None:
    # Prepare
    split = _split()
    model = _model(split)
    builder = ExampleBuilder.from_split(split, MCFG)
    batch = builder.train_batch(np.array([0, 3, 3, 7, 11, 19, 23, 39]), np.random.default_rng(1))
    clip = 0.01  # below every per-user norm: each contribution is rescaled
    brute = compute_brute_force_clipped_sum(model, batch, clip)
    # Execute
    ghost = compute_ghost_clipped_sum(model, batch, clip)
    # Assert
    for name in ("price_emb.weight", "hist_price_emb.weight", "text_proj.weight", "item_emb.weight"):
        assert torch.allclose(ghost[name], brute[name], rtol=1e-4, atol=1e-8), name


def test_dp_fit_with_price_and_text_runs_and_charges_the_ledger_entry() -> None:
    # Prepare: the default DP clipping path of the trainer, on features
    split = _split()
    cfg = Config(model=MCFG, train=TrainConfig(batch_size=10, epochs=1),
                 privacy=PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=0.1))
    trainer = LocalTrainer(cfg, split)
    before = trainer.get_shared()["text_proj.weight"].copy()
    # Execute
    result = trainer.fit(1)
    # Assert: the text projection was trained (DP noise at least), the accounting entry is sane
    assert not np.array_equal(before, trainer.get_shared()["text_proj.weight"])
    assert result.steps >= 1 and result.noise_multiplier == 1.0 and result.epsilon is not None


def _split_with_users(seed: int = 0) -> SplitData:
    split = _split(seed)
    rng = np.random.default_rng(seed + 1)
    sizes = (4, 3)  # codes per column, 0 = missing
    feats = np.stack([rng.integers(0, s, size=split.n_users) for s in sizes], axis=1)
    ds = dataclasses.replace(split.dataset, user_features=feats, user_feature_sizes=sizes,
                             user_feature_names=("age_band", "region"))
    return dataclasses.replace(split, dataset=ds)


def test_user_features_join_the_user_vector_from_the_users_own_codes() -> None:
    # Prepare
    split = _split_with_users()
    mcfg = dataclasses.replace(MCFG, use_user_features=True, use_price=False, use_text=False)
    model = build_model(mcfg, split.n_users, split.n_items, user_features=split.dataset.user_features,
                        user_feature_sizes=split.dataset.user_feature_sizes)
    feats = split.dataset.user_features
    # Execute
    f = model._user_features(torch.arange(split.n_users))
    # Assert: f_u = (e[age_u] + e[4 + region_u]) / sqrt(2): column 2's codes follow column 1's 4 rows
    w = model.user_feat_emb.weight
    manual = (w[torch.as_tensor(feats[:, 0])] + w[4 + torch.as_tensor(feats[:, 1])]) / 2 ** 0.5
    assert torch.allclose(f, manual, atol=1e-6)
    assert "user_feat_emb.weight" in model.shared_parameter_names()
    assert "user_feat" not in model.shared_parameter_names()  # the codes are local state, never sent


def test_user_features_out_of_range_or_missing_are_refused() -> None:
    split = _split_with_users()
    mcfg = dataclasses.replace(MCFG, use_user_features=True)
    with pytest.raises(ModelError, match="model.use_user_features: the data set has no user features"):
        build_model(mcfg, split.n_users, split.n_items, item_price_bin=split.dataset.item_price_bin,
                    item_text=split.dataset.item_text)
    with pytest.raises(ModelError, match="below"):
        build_model(mcfg, split.n_users, split.n_items, item_price_bin=split.dataset.item_price_bin,
                    item_text=split.dataset.item_text, user_features=split.dataset.user_features,
                    user_feature_sizes=(2, 2))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_ghost_clipping_matches_brute_force_with_user_features() -> None:
    # Prepare
    split = _split_with_users()
    mcfg = dataclasses.replace(MCFG, use_user_features=True, use_mlp=True)
    torch.manual_seed(0)
    model = build_model(mcfg, split.n_users, split.n_items, item_price_bin=split.dataset.item_price_bin,
                        item_text=split.dataset.item_text, user_features=split.dataset.user_features,
                        user_feature_sizes=split.dataset.user_feature_sizes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = ExampleBuilder.from_split(split, mcfg).train_batch(np.array([0, 3, 3, 7, 11, 19, 23, 39]),
                                                               np.random.default_rng(1))
    clip = 0.01
    brute = compute_brute_force_clipped_sum(model, batch, clip)
    # Execute
    ghost = compute_ghost_clipped_sum(model, batch, clip)
    # Assert
    for name in ("user_feat_emb.weight", "mlp.0.weight", "item_emb.weight"):
        assert torch.allclose(ghost[name], brute[name], rtol=1e-4, atol=1e-8), name


def test_dp_fit_with_user_features_on_a_partner_split() -> None:
    # Prepare: a partner's split keeps the global code sizes, so every partner's table has one shape
    from fedsocial.shared.partition import partner_split

    split = _split_with_users()
    part = partner_split(split, np.arange(split.n_users) % 2, 1)
    cfg = Config(model=dataclasses.replace(MCFG, use_user_features=True), train=TrainConfig(batch_size=10),
                 privacy=PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=0.1))
    # Execute
    trainer = LocalTrainer(cfg, part)
    result = trainer.fit(1)
    # Assert
    assert part.dataset.user_feature_sizes == (4, 3) and part.dataset.user_features.shape == (20, 2)
    assert trainer.get_shared()["user_feat_emb.weight"].shape == (7, 8) and result.steps >= 1
