"""Model contract, residual MLP start, leave-one-out bag, parameter ownership, per-user batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsocial.shared.batching import ExampleBuilder, sample_padded
from fedsocial.shared.config import Config, DataConfig, ModelConfig
from fedsocial.shared.models import MODELS, ModelError, SocialRec, build_model
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate


def _data(mcfg: ModelConfig) -> tuple[ExampleBuilder, int, int]:
    cfg = Config(data=DataConfig(n_users=30, n_items=40, interactions_per_user=8.0))
    split = split_dataset(generate(cfg.data), cfg.split)
    return ExampleBuilder.from_split(split, mcfg), split.n_users, split.n_items


@pytest.mark.parametrize("name", list(MODELS))
def test_contract_shapes(name: str) -> None:
    mcfg = ModelConfig(name=name, dim=8, mlp_hidden=8)
    builder, nu, ni = _data(mcfg)
    model = build_model(mcfg, nu, ni, item_counts=builder.item_counts())
    users = np.array([0, 1, 2, 5])
    loss = model(builder.train_batch(users, np.random.default_rng(0)))
    scores = model.full_sort_predict(builder.eval_batch(users))
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert scores.shape == (4, ni)
    items = torch.tensor([[1, 2], [3, 4], [0, 0], [7, 9]])
    torch.testing.assert_close(model.predict(builder.eval_batch(users), items), torch.gather(scores, 1, items))


def test_residual_mlp_starts_as_the_dot_product_model() -> None:
    mcfg = ModelConfig(dim=8, mlp_hidden=8, aggregator="attention")
    builder, nu, ni = _data(mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, nu, ni)
    assert isinstance(model, SocialRec) and model.mlp is not None
    batch = builder.eval_batch(np.arange(6))
    with_mlp = model.user_vectors(batch)
    model.mlp = None
    torch.testing.assert_close(with_mlp, model.user_vectors(batch))


def test_target_is_left_out_of_its_own_bag() -> None:
    # Prepare: one user, the target in the bag; perturb the target's history row
    mcfg = ModelConfig(dim=8, mlp_hidden=8, use_social=False, user_embedding="none")
    builder, nu, ni = _data(mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, nu, ni)
    assert isinstance(model, SocialRec) and model.hist_emb is not None
    batch = builder.train_batch(np.array([0]), np.random.default_rng(0))
    assert batch["target_in_bag"][0, 0] == 1
    target = int(batch["targets"][0, 0])
    h_before = model.target_user_vectors(batch)[0][0, 0].detach().clone()
    # Execute
    with torch.no_grad():
        model.hist_emb.weight[target] += 1.0
    h_after = model.target_user_vectors(batch)[0]
    # Assert: the target's own vector ignores its history row; other targets' vectors see it
    torch.testing.assert_close(h_after[0, 0], h_before)
    assert not torch.allclose(h_after[0, 1], model.target_user_vectors(batch)[0][0, 0])


def test_shared_and_local_parameter_names() -> None:
    mcfg = ModelConfig(aggregator="attention", user_embedding="trained")
    model = build_model(mcfg, 10, 12)
    shared, local = set(model.shared_parameter_names()), set(model.local_parameter_names())
    assert {"item_emb.weight", "item_bias.weight", "hist_emb.weight"} <= shared
    assert any(n.startswith("mlp.") for n in shared) and any(n.startswith("att.") for n in shared)
    assert local == {"social_emb.weight", "user_emb.weight"}
    bpr = build_model(ModelConfig(name="bpr"), 10, 12)
    assert bpr.shared_parameter_names() == ["item_emb.weight"] and bpr.local_parameter_names() == ["user_emb.weight"]


def test_sample_padded_takes_all_or_a_sample_without_replacement() -> None:
    indptr, indices = np.array([0, 3, 3, 10]), np.arange(10)
    ids, mask = sample_padded(indptr, indices, np.array([0, 1, 2]), 4, np.random.default_rng(0))
    assert ids.shape == (3, 4) and mask.sum(1).tolist() == [3, 0, 4]
    assert sorted(ids[0, :3].tolist()) == [0, 1, 2]
    picked = ids[2][mask[2] > 0]
    assert len(set(picked.tolist())) == 4 and set(picked.tolist()) <= set(range(3, 10))


def test_negatives_that_are_positives_are_masked() -> None:
    mcfg = ModelConfig(num_negatives=200)
    builder, _, _ = _data(mcfg)
    batch = builder.train_batch(np.array([0, 1]), np.random.default_rng(0))
    for b, u in enumerate([0, 1]):
        own = set(builder.item_indices[builder.item_indptr[u]:builder.item_indptr[u + 1]].tolist())
        neg, m = batch["negatives"][b].numpy(), batch["neg_mask"][b].numpy()
        assert all((m[j] == 0) == (int(neg[j]) in own) for j in range(len(neg)))


def test_bias_scale_reparameterises_the_bias_without_changing_scores() -> None:
    # Prepare: two copies of one model, the second with c_i = 4 * b_i and b_i = c_i / 4
    plain_cfg = ModelConfig(dim=8, mlp_hidden=8, temperature=0.5, loss="softmax")
    scaled_cfg = ModelConfig(dim=8, mlp_hidden=8, temperature=0.5, loss="softmax", bias_scale=4.0)
    builder, nu, ni = _data(plain_cfg)
    torch.manual_seed(0)
    plain = build_model(plain_cfg, nu, ni)
    scaled = build_model(scaled_cfg, nu, ni)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        plain.item_bias.weight.normal_(0.0, 1.0)
        scaled.item_bias.weight.copy_(plain.item_bias.weight / 4.0)
    users = np.arange(6)
    batch = builder.train_batch(users, np.random.default_rng(0))
    # Execute
    plain(batch).sum().backward()
    scaled(batch).sum().backward()
    # Assert: same scores and losses; the bias gradient is 4x, every other gradient unchanged
    torch.testing.assert_close(scaled.full_sort_predict(builder.eval_batch(users)),
                               plain.full_sort_predict(builder.eval_batch(users)))
    torch.testing.assert_close(scaled.item_bias.weight.grad, 4.0 * plain.item_bias.weight.grad)
    torch.testing.assert_close(scaled.item_emb.weight.grad, plain.item_emb.weight.grad)


def test_category_vectors_are_shared_by_the_items_of_a_category() -> None:
    # Prepare: item vectors zeroed, so an item's score is its category's term plus its bias
    mcfg = ModelConfig(dim=8, mlp_hidden=8, use_category=True, temperature=1.0, loss="softmax")
    cfg = Config(data=DataConfig(n_users=30, n_items=40, interactions_per_user=8.0))
    split = split_dataset(generate(cfg.data), cfg.split)
    builder = ExampleBuilder.from_split(split, mcfg)
    torch.manual_seed(0)
    model = build_model(mcfg, split.n_users, split.n_items, item_category=split.dataset.item_category)
    assert isinstance(model, SocialRec) and model.cat_emb is not None
    cats = split.dataset.item_category
    with torch.no_grad():
        model.item_emb.weight.zero_()
        model.cat_emb.weight.normal_(0.0, 1.0)
    # Execute
    scores = model.full_sort_predict(builder.eval_batch(np.arange(5))).detach()
    with torch.no_grad():
        model.cat_emb.weight[int(cats[0])] += 1.0
    moved = model.full_sort_predict(builder.eval_batch(np.arange(5))).detach()
    # Assert: equal scores within a category; moving one category's vector moves only its items
    for c in np.unique(cats):
        same = np.flatnonzero(cats == c)
        torch.testing.assert_close(scores[:, same], scores[:, same[:1]].expand(-1, len(same)))
    changed = (moved - scores).abs().amax(0) > 1e-6
    assert changed.numpy().tolist() == (cats == cats[0]).tolist()
    assert {"cat_emb.weight", "hist_cat_emb.weight"} <= set(model.shared_parameter_names())


def test_category_model_without_categories_in_the_data_is_refused() -> None:
    # Execute / Assert
    with pytest.raises(ModelError, match="model.use_category"):
        build_model(ModelConfig(dim=8, use_category=True), 10, 20)
