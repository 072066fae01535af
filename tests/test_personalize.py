"""privacy.scope = partner (client/personalize.py) and --compare-alone (simulations/compare_alone.py).

Pure functions on known values; the personalisation on a tiny synthetic partner (never below the
shared model or the alone model on validation, the shared model untouched, the alone model non-private
with the federation's budget); and two federations on the same tiny data, one per scope, with a
recorder that hashes every array a client sends. A partner driven through two rounds in each scope
sends byte-identical updates and keeps identical DP-round state, so nothing learnt without DP leaves
a partner or feeds its DP update; a partner-scope federation sends only updates and whitelisted scalars.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedsocial.client.partner import EVAL_METRIC_KEYS, Partner, compute_local_config, settings_from_context
from fedsocial.client.personalize import (
    PERSONAL_DIR,
    ScoreMixture,
    choose_on_validation,
    compute_alone_config,
    compute_maxt_pvalues,
    compute_safe_choice,
    compute_standardised_scores,
    evaluate_personalised,
    fine_tune,
    personalise,
    train_alone_model,
)
from fedsocial.server.checkpoint import latest_checkpoint
from fedsocial.shared.config import Config, config_from_dict
from fedsocial.shared.metrics import evaluate_model
from fedsocial.shared.partition import partition_users, partner_split
from fedsocial.shared.privacy.audit import audit_run
from fedsocial.shared.split import split_dataset
from fedsocial.shared.synthetic import generate
from fedsocial.shared.trainer import LocalTrainer
from fedsocial.simulations.audit import main as audit_main
from fedsocial.simulations.compare_alone import compute_federation_gain, compute_ratio
from fedsocial.simulations.compare_alone import main as compare_alone_main
from fedsocial.simulations.simulate import build_parser, config_from_cli, run_simulation_from_config, write_config
from tests.noise_keys import share_noise_keys

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def tiny_config(scope: str = "joint", **federation: Any) -> Config:
    fed = {"partners": 2, "rounds": 2, "local_epochs": 1, "clipping_norm": 1.0, "min_partners": 2, **federation}
    return config_from_dict({
        "data": {"format": "synthetic", "n_users": 120, "n_items": 80, "n_communities": 2,
                 "interactions_per_user": 12.0, "friends_per_user": 4.0},
        "model": {"dim": 8, "mlp_hidden": 8, "max_neighbors": 5, "max_targets": 8, "num_negatives": 4,
                  "user_embedding": "local", "local_refit_steps": 5},
        "train": {"batch_size": 16, "lr": 0.01, "seed": 1, "num_threads": 1, "eval_every": 1},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.5, "target_delta": 1e-4,
                    "max_epsilon": 50.0, "scope": scope},
        "federation": fed,
    })


# --- pure functions --------------------------------------------------------------------------
def test_federation_gain_is_the_mean_of_per_partner_ratios() -> None:
    served = {"a": 0.2, "b": 0.1, "c": 0.3}
    alone = {"a": 0.1, "b": 0.1, "c": 0.6, "d": 0.5}  # d has no served metrics: not counted

    gain = compute_federation_gain(served, alone)

    assert gain == pytest.approx((2.0 + 1.0 + 0.5) / 3)


def test_ratio_with_a_zero_alone_score() -> None:
    assert compute_ratio(0.0, 0.0) == 1.0
    assert compute_ratio(0.1, 0.0) == math.inf
    with pytest.raises(ValueError, match="no partner"):
        compute_federation_gain({"a": 0.1}, {"b": 0.1})


def test_choice_is_the_best_validation_score_ties_to_the_first() -> None:
    assert choose_on_validation({"shared": 0.2, "alone": 0.3, "mix": 0.25}) == "alone"
    assert choose_on_validation({"shared": 0.3, "alone": 0.3}) == "shared"
    with pytest.raises(ValueError):
        choose_on_validation({})


def _brute_force_maxt(d: np.ndarray) -> np.ndarray:
    """Step-down max-T by the book: every sign vector of the users, each column's t by the textbook formula;
    the j-th largest observed t against the maximum over it and the smaller ones; p made monotone."""
    n, c = d.shape

    def t_of(x: np.ndarray) -> np.ndarray:
        return np.array([x[:, j].mean() / (x[:, j].std(ddof=1) / math.sqrt(n)) for j in range(c)])

    observed = t_of(d)
    flips = [t_of(np.array([-1.0 if code >> u & 1 else 1.0 for u in range(n)])[:, None] * d) for code in range(2 ** n)]
    order = sorted(range(c), key=lambda j: -observed[j])
    p, running = np.empty(c), 0.0
    for step, j in enumerate(order):
        rest = order[step:]
        running = max(running, float(np.mean([max(f[k] for k in rest) >= observed[j] - 1e-9 for f in flips])))
        p[j] = running
    return p


def test_maxt_exact_enumeration_matches_brute_force() -> None:
    # Prepare: 7 users, 3 challengers (128 sign vectors: enumerated exactly)
    rng = np.random.default_rng(4)
    d = rng.normal(0.3, 1.0, (7, 3))
    # Execute
    p, _ = compute_maxt_pvalues(d)
    # Assert
    np.testing.assert_allclose(p, _brute_force_maxt(d), atol=1e-12)
    assert p.min() >= 1 / 128  # the identity flip is always counted


def test_maxt_critical_t_known_values() -> None:
    # Prepare: 2,000 users; one challenger, eight independent ones, eight identical ones
    rng = np.random.default_rng(0)
    one, eight = rng.normal(size=(2000, 1)), rng.normal(size=(2000, 8))
    # Execute
    crit_one = compute_maxt_pvalues(one, seed=1)[1]
    crit_independent = compute_maxt_pvalues(eight, seed=1)[1]
    crit_identical = compute_maxt_pvalues(np.repeat(one, 8, axis=1), seed=1)[1]
    # Assert: the one-sided normal quantile 1.645; Sidak's for 8 independent, z(0.95 ** (1 / 8)) = 2.49;
    # identical challengers pay nothing for their number (Bonferroni would ask 2.50 of them)
    assert crit_one == pytest.approx(1.645, abs=0.06)
    assert crit_independent == pytest.approx(2.49, abs=0.08)
    assert crit_identical == pytest.approx(crit_one, abs=1e-9)


def test_maxt_pvalues_properties() -> None:
    # Prepare
    rng = np.random.default_rng(2)
    d = rng.normal(0.05, 1.0, (300, 4))
    d[:, 3] = 0.0  # a challenger that ranks every user as alone does
    # Execute
    p, _ = compute_maxt_pvalues(d, n_flips=999, seed=3)
    # Assert: scale-free, columns permute with their p, reproducible with the seed, valid Monte-Carlo p
    np.testing.assert_allclose(compute_maxt_pvalues(7.0 * d, n_flips=999, seed=3)[0], p)
    np.testing.assert_allclose(compute_maxt_pvalues(d[:, ::-1], n_flips=999, seed=3)[0], p[::-1])
    assert p[3] == 1.0 and p.min() >= 1 / 1000
    t = d.mean(axis=0) / (d.std(axis=0, ddof=1) + 1e-300)
    assert (np.diff(p[np.argsort(-t)]) >= 0).all()  # step-down: a larger t never gets a larger p
    constant = compute_maxt_pvalues(np.full((300, 1), 0.01), n_flips=999)[0]  # the same gain for every user
    assert constant[0] == pytest.approx(1 / 1000)
    assert (compute_maxt_pvalues(np.ones((1, 2)))[0] == 1.0).all()  # one user: never significant


def test_safe_choice_replaces_alone_at_most_at_the_stated_rate_under_the_null() -> None:
    # Prepare: 600 trials of 8 correlated challengers (mixtures of two models with alone, as personalise's
    # candidates are) whose per-user NDCG has alone's distribution: no true margin anywhere
    rng = np.random.default_rng(1)

    def ndcg(size: int) -> np.ndarray:
        return rng.binomial(1, 0.15, size) * rng.uniform(0, 1, size)  # sparse, as NDCG@10 of 300 users is

    replaced = 0
    for _ in range(600):
        alone, a, b = ndcg(300), ndcg(300), ndcg(300)
        cands = {"alone": alone, "shared": a, "finetune": b}
        for w in (0.25, 0.5, 0.75):
            cands[f"mix:shared:{w}"], cands[f"mix:finetune:{w}"] = w * a + (1 - w) * alone, w * b + (1 - w) * alone
        val = {name: {"ndcg@10": float(v.mean())} for name, v in cands.items()}
        # Execute
        replaced += compute_safe_choice(val, cands, seed=int(rng.integers(1 << 30)), n_flips=499)[0] != "alone"
    # Assert: at most about 5 % of trials serve anything but alone (binomial 4-sigma: 0.05 + 4 sqrt(0.0475 / 600))
    assert replaced / 600 < 0.0856


def test_safe_choice_serves_the_best_significant_challenger_where_bonferroni_would_not() -> None:
    # Prepare: 400 users; four nearly identical challengers 2.3 standard errors above alone, and a noisy one
    # with the best mean (Bonferroni over five asks z 2.33 of each; max-T of this family about 1.95)
    rng = np.random.default_rng(5)
    alone = rng.uniform(0, 1, 400)
    gain = rng.normal(0, 0.2, 400)
    gain += 2.3 * 0.2 / 20 - gain.mean()
    noise = rng.normal(0, 1.0, 400)
    noise += 0.04 - noise.mean()  # t 0.8
    cands = {"alone": alone, **{f"mix:{k}": alone + gain + rng.normal(0, 0.002, 400) for k in range(4)},
             "noisy": alone + noise}
    val = {name: {"ndcg@10": float(v.mean())} for name, v in cands.items()}
    # Execute
    choice, safety, p = compute_safe_choice(val, cands, seed=0)
    # Assert: the best mean (noisy) is recorded but not significant; the best significant mixture is served
    assert max(val, key=lambda k: val[k]["ndcg@10"]) == "noisy" and safety["p"] == p["noisy"] > 0.05
    assert choice.startswith("mix:") and p[choice] <= 0.05
    assert val[choice]["ndcg@10"] == max(val[k]["ndcg@10"] for k in p if p[k] <= 0.05)
    assert safety["critical_t"] < 2.3 < 2.326
    # alone is served when no challenger passes, or when there is none
    flat = {name: alone + rng.normal(0, 0.2, 400) for name in ("shared", "finetune")} | {"alone": alone}
    assert compute_safe_choice({k: {"ndcg@10": float(v.mean())} for k, v in flat.items()}, flat, 0)[0] == "alone"
    assert compute_safe_choice({"alone": {"ndcg@10": 0.1}}, {"alone": alone}, 0) == ("alone", {}, {})


def test_standardised_scores_keep_ranks_and_have_unit_rows() -> None:
    rng = np.random.default_rng(0)
    scores = torch.as_tensor(rng.normal(3.0, 5.0, size=(4, 50)))

    z = compute_standardised_scores(scores)

    np.testing.assert_allclose(z.mean(1).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(1).numpy(), 1.0, atol=1e-12)
    assert torch.equal(z.argsort(1), scores.argsort(1))


def test_alone_config_is_non_private_with_the_federation_budget() -> None:
    cfg = tiny_config(rounds=3, local_epochs=2, local_batch_size=8)

    alone = compute_alone_config(cfg)

    assert not alone.privacy.enabled
    assert alone.train.epochs == 3 * 2 and alone.train.batch_size == 8
    assert alone.model == cfg.model and alone.train.lr == cfg.train.lr


# --- personalisation on one tiny partner -----------------------------------------------------
@pytest.fixture(scope="module")
def partner_split_and_cfg() -> tuple[Any, Config]:
    cfg = compute_local_config(tiny_config("partner", rounds=3))
    dataset = generate(cfg.data)
    split = split_dataset(dataset, cfg.split)
    return partner_split(split, partition_users(dataset, 2, cfg.partition), 0), cfg


def test_alone_model_is_trained_without_dp_and_within_the_budget(partner_split_and_cfg: tuple[Any, Config],
                                                                 tmp_path: Path) -> None:
    part, cfg = partner_split_and_cfg

    model, outcome = train_alone_model(cfg, part, tmp_path)
    cached, again = train_alone_model(cfg, part, tmp_path)

    assert outcome is not None and again is None  # the second call loads the cache
    assert outcome.epsilon is None and outcome.noise_multiplier == 0.0
    assert 1 <= outcome.epochs_run <= cfg.federation.rounds * cfg.federation.local_epochs
    for a, b in zip(model.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no key", "foreign arrays"])
def test_an_unusable_alone_cache_is_trained_again_with_a_warning(partner_split_and_cfg: tuple[Any, Config],
                                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 damage: str) -> None:
    # Prepare: a good cache, then damaged in place (a partner's ClientApp once died on np.load / KeyError here)
    part, cfg = partner_split_and_cfg
    model, _ = train_alone_model(cfg, part, tmp_path)
    cache = tmp_path / "alone.npz"
    with np.load(cache) as z:
        key = z["__key__"]
    if damage == "garbage":
        cache.write_bytes(b"xx")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:100])
    elif damage == "no key":
        np.savez(cache, w=np.zeros(3))
    else:
        np.savez(cache, __key__=key, w=np.zeros(3))
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedsocial.client"):
        again, outcome = train_alone_model(cfg, part, tmp_path)
        reloaded, none = train_alone_model(cfg, part, tmp_path)
    # Assert: trained again, the warning names the file, and the rewritten cache loads the next time
    assert outcome is not None and none is None
    assert any(str(cache) in r.getMessage() and "training it again" in r.getMessage() for r in caplog.records)
    for a, b in zip(again.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_served_is_never_below_alone_on_validation(partner_split_and_cfg: tuple[Any, Config],
                                                             tmp_path: Path) -> None:
    part, cfg = partner_split_and_cfg
    trainer = LocalTrainer(cfg, part, seed=3)
    trainer.fit(1, noise_multiplier=1.0, rng_seed=5)  # a (weak) DP model as the shared one
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    result = personalise(cfg, part, trainer.model, tmp_path, seed=7)

    chosen = result.val[result.choice]["ndcg@10"]
    best = result.best_on_validation
    assert result.val[best]["ndcg@10"] == max(v["ndcg@10"] for v in result.val.values())
    assert chosen >= result.val["alone"]["ndcg@10"]
    # served: the best of the challengers significantly above alone (max-T, familywise 5 %), else alone
    passed = {k: result.val[k]["ndcg@10"] for k, p in result.p_adjusted.items() if p <= 0.05}
    assert set(result.p_adjusted) == set(result.val) - {"alone"}
    assert result.choice == (max(passed, key=passed.__getitem__) if passed else "alone")
    assert best == "alone" or result.safety["p"] == result.p_adjusted[best]
    served, n = evaluate_model(result.model, part, "test")
    assert served == pytest.approx(result.test[result.choice]) and n == result.evaluated_users > 0
    for k, v in trainer.model.state_dict().items():  # the DP model the next round starts from is untouched
        assert torch.equal(v, before[k]), k
    assert {"shared", "alone", "finetune", "mix:finetune:0.5"} <= set(result.val)
    assert (tmp_path / PERSONAL_DIR / "alone.npz").is_file()


def test_one_pass_over_the_candidates_gives_each_candidates_own_figures(
        partner_split_and_cfg: tuple[Any, Config]) -> None:
    # Prepare: three different models and the six mixtures personalise() builds; small chunks (many batches)
    from fedsocial.client.personalize import MIX_ALPHAS, evaluate_candidates
    from fedsocial.shared.batching import ExampleBuilder
    from fedsocial.shared.metrics import evaluate_model_per_user

    part, cfg = partner_split_and_cfg
    trainers = [LocalTrainer(cfg, part, seed=s) for s in (3, 4, 5)]
    for t, epochs in zip(trainers, (1, 2, 0), strict=True):
        if epochs:
            t.fit(epochs, noise_multiplier=1.0, rng_seed=5)
    models: dict[str, Any] = dict(zip(("shared", "alone", "finetune"), (t.model for t in trainers), strict=True))
    for base in ("shared", "finetune"):
        for alpha in MIX_ALPHAS:
            models[f"mix:{base}:{alpha:g}"] = ScoreMixture(models[base], models["alone"], alpha)
    builder = ExampleBuilder.from_split(part, cfg.model)
    modes = {name: m.training for name, m in models.items()}
    # Execute
    together = {which: evaluate_candidates(models, part, which, builder, batch_size=7) for which in ("val", "test")}
    # Assert: bit for bit what one evaluation per candidate gives, every metric and every user's NDCG@10
    for which, results in together.items():
        assert set(results) == set(models)
        for name, m in models.items():
            metrics, n, rows = evaluate_model_per_user(m, part, which, builder=builder)
            assert results[name][0] == metrics and results[name][1] == n > 0, (which, name)
            assert np.array_equal(results[name][2], rows), (which, name)
    assert {name: m.training for name, m in models.items()} == modes


def test_per_user_evaluation_builds_no_autograd_graph(partner_split_and_cfg: tuple[Any, Config]) -> None:
    # Regression: evaluate_model_per_user (personalise, the DP selection) scored with autograd on; with the
    # candidates' shared scores that kept every chunk's graph alive (a Ciao partner's pass grew past 20 GB)
    from fedsocial.shared.metrics import evaluate_model_per_user

    part, cfg = partner_split_and_cfg
    model = LocalTrainer(cfg, part, seed=3).model
    seen: list[bool] = []
    score_all = model.score_all

    def spy(batch: Any, side: Any) -> torch.Tensor:
        out = score_all(batch, side)
        seen.append(torch.is_grad_enabled() or out.requires_grad)
        return out

    model.score_all = spy  # type: ignore[method-assign]
    evaluate_model_per_user(model, part, "val")
    assert seen and not any(seen)


def test_the_record_keeps_every_candidates_per_user_validation_ndcg(partner_split_and_cfg: tuple[Any, Config],
                                                                  tmp_path: Path) -> None:
    # Prepare
    part, cfg = partner_split_and_cfg
    trainer = LocalTrainer(cfg, part, seed=3)
    trainer.fit(1, noise_multiplier=1.0, rng_seed=5)
    # Execute
    evaluate_personalised(cfg, part, trainer.model, tmp_path, 3, seed=7)
    # Assert: one array per candidate of the record, the same users, averaging to its validation NDCG@10
    record = json.loads((tmp_path / PERSONAL_DIR / "round_0003.json").read_text(encoding="utf-8"))
    with np.load(tmp_path / PERSONAL_DIR / "round_0003_val_ndcg.npz") as per_user:
        assert set(per_user.files) == set(record["val"])
        assert len({per_user[name].shape for name in per_user.files}) == 1
        for name in per_user.files:
            assert per_user[name].mean() == pytest.approx(record["val"][name]["ndcg@10"], abs=1e-9), name


def test_partner_scope_personalises_a_model_with_the_dp_popularity_prior(
    partner_split_and_cfg: tuple[Any, Config], tmp_path: Path
) -> None:
    # Regression: the non-private fine-tune copy had no item_pop, so loading the DP model failed
    part, cfg = partner_split_and_cfg
    cfg = cfg.replace("privacy", popularity_noise_multiplier=3.0)
    trainer = LocalTrainer(cfg, part, seed=3)
    trainer.set_item_popularity(np.random.default_rng(0).normal(0, 1, part.n_items))
    trainer.fit(1, noise_multiplier=1.0, rng_seed=5)

    result = personalise(cfg, part, trainer.model, tmp_path, seed=7)
    tuned, _ = fine_tune(cfg, part, trainer.model, 2, seed=7)

    assert "finetune" in result.val and result.evaluated_users > 0
    assert torch.equal(tuned.item_pop, trainer.model.item_pop)  # the fine-tune keeps the prior, untrained


def test_mixture_with_weight_one_ranks_as_its_base(partner_split_and_cfg: tuple[Any, Config]) -> None:
    part, cfg = partner_split_and_cfg
    a, b = LocalTrainer(cfg, part, seed=1).model, LocalTrainer(cfg, part, seed=2).model

    pure, _ = evaluate_model(ScoreMixture(a, b, 1.0), part, "val")
    base, _ = evaluate_model(a, part, "val")

    assert pure == pytest.approx(base)
    with pytest.raises(ValueError, match="alpha"):
        ScoreMixture(a, b, 1.5)


# --- the federation in both scopes ------------------------------------------------------------
def make_hashing_recorder(folder: Path) -> Any:
    """A Flower mod: SHA-256 of every array and the value of every scalar in each reply a client sends."""

    def hashing_recorder_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
        out = call_next(msg, ctxt)
        if not out.has_error():
            content = out.content
            rec = {"partition": int(ctxt.node_config["partition-id"]), "type": out.metadata.message_type,
                   "arrays": {rn: {k: hashlib.sha256(a.data).hexdigest() for k, a in r.items()}
                              for rn, r in content.array_records.items()},
                   "configs": {rn: {k: v for k, v in r.items() if isinstance(v, (bool, int, float, str))}
                               for rn, r in content.config_records.items()},
                   "metrics": {rn: dict(r) for rn, r in content.metric_records.items()}}
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"egress-{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")
        return out

    return hashing_recorder_mod


def read_egress(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def train_replies(records: list[dict[str, Any]]) -> dict[tuple[int, int], Any]:
    out = {}
    for r in records:
        if r["type"] == "train":
            rounds = [v["round"] for rn, v in r["configs"].items() if "round" in v]
            out[(r["partition"], int(rounds[0]))] = (r["arrays"], r["configs"])
    return out


def partner_rounds(cfg: Config, run: Path) -> dict[str, Any]:
    """Two rounds of one partner without Flower: fit, evaluate, fit, evaluate (as the federation calls them)."""
    partner = Partner(settings_from_context({"config-path": str(write_config(cfg, run)), "run-dir": str(run)},
                                            {"partition-id": 0, "num-partitions": 2}))
    _, arrays = partner.initial_parameters()
    out: dict[str, Any] = {"fit": [], "eval": []}
    for round_ in (1, 2):
        arrays, weight, metrics = partner.fit(arrays, round_)
        # the ledger head differs by design: each run signs with its own key and the entry names the scope
        out["fit"].append((list(arrays), weight, {k: v for k, v in metrics.items()
                                                  if k not in ("fit_time_s", "ledger_head")}))
        result, n = partner.evaluate(arrays, round_)
        if result is None:  # under DP the evaluation may stay on the partner: its own record
            result = json.loads((run / "partners" / "partner-0" / "eval" / f"round_{round_:04d}.json").read_text())
        out["eval"].append((result, n))
    return out


def test_partner_scope_changes_nothing_a_partner_sends_or_trains_with(tmp_path: Path) -> None:
    share_noise_keys(1, tmp_path / "joint", tmp_path / "partner")  # the same DP noise in both scopes
    joint = partner_rounds(tiny_config("joint"), tmp_path / "joint")
    partner = partner_rounds(tiny_config("partner"), tmp_path / "partner")

    for (a_arrays, a_w, a_m), (b_arrays, b_w, b_m) in zip(joint["fit"], partner["fit"], strict=True):
        assert a_w == b_w and a_m == b_m  # same weight, epsilon, loss, steps
        for x, y in zip(a_arrays, b_arrays, strict=True):  # byte-identical shared parameters
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    state = Path("partners") / "partner-0" / "state.npz"
    sj, sp = np.load(tmp_path / "joint" / state), np.load(tmp_path / "partner" / state)
    assert sorted(sj.files) == sorted(sp.files)
    for k in sj.files:  # the local tables the next DP round starts from
        np.testing.assert_array_equal(sj[k], sp[k])
    personal = tmp_path / "partner" / "partners" / "partner-0" / PERSONAL_DIR
    record = json.loads((personal / "round_0002.json").read_text())
    served, _ = partner["eval"][1]
    shared, _ = joint["eval"][1]
    assert record["test"]["shared"]["ndcg@10"] == pytest.approx(shared["ndcg@10"])  # shared-only = joint served
    assert served["ndcg@10"] == pytest.approx(record["test"][record["choice"]]["ndcg@10"])
    assert not (tmp_path / "joint" / "partners" / "partner-0" / PERSONAL_DIR).exists()


def test_partner_scope_personalises_once_after_the_last_round(tmp_path: Path) -> None:
    # Prepare: three rounds of one partner in partner scope, evaluated after each
    cfg = tiny_config("partner", rounds=3)
    partner = Partner(settings_from_context({"config-path": str(write_config(cfg, tmp_path)), "run-dir": str(tmp_path)},
                                            {"partition-id": 0, "num-partitions": 2}))
    _, arrays = partner.initial_parameters()
    # Execute
    for round_ in (1, 2, 3):
        arrays, _, _ = partner.fit(arrays, round_)
        partner.evaluate(arrays, round_)
    # Assert: one personalisation (the last round's); the earlier rounds record the shared DP model as served
    folder = tmp_path / "partners" / "partner-0"
    assert sorted(f.name for f in (folder / PERSONAL_DIR).glob("round_*.json")) == ["round_0003.json"]
    first = json.loads((folder / "eval" / "round_0001.json").read_text())
    record = json.loads((folder / PERSONAL_DIR / "round_0003.json").read_text())
    last = json.loads((folder / "eval" / "round_0003.json").read_text())
    assert 0.0 <= first["ndcg@10"] <= 1.0  # round 1 was evaluated (the shared DP model), not personalised
    assert last["ndcg@10"] == pytest.approx(record["test"][record["choice"]]["ndcg@10"])


@pytest.fixture(scope="module")
def partner_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("scope")
    doc = run_simulation_from_config(tiny_config("partner", compare_alone=True), None, base / "run", progress=False,
                                     client_mods=[make_hashing_recorder(base / "egress")])
    return {"base": base, "doc": doc}


@pytest.mark.slow  # one in-process Flower federation (Ray start-up dominates)
def test_partner_scope_replies_carry_only_the_update_and_whitelisted_scalars(partner_run: dict[str, Any]) -> None:
    base = partner_run["base"]
    records = read_egress(base / "egress")
    ckpt = latest_checkpoint(base / "run")
    assert ckpt is not None
    personal = [np.load(f) for f in (base / "run" / "partners").glob(f"*/{PERSONAL_DIR}/*.npz")]
    personal_hashes = {hashlib.sha256(z[k].tobytes()).hexdigest() for z in personal for k in z.files}

    assert set(train_replies(records)) == {(p, r) for p in (0, 1) for r in (1, 2)}
    assert personal, "the partners kept their local models"
    for rec in records:
        sent = {h for arrays in rec["arrays"].values() for h in arrays.values()}
        assert not sent & personal_hashes
        if rec["type"] == "evaluate":
            assert not sent
            for rn, values in rec["configs"].items():
                if not rn.endswith(".status"):
                    assert set(values) <= EVAL_METRIC_KEYS, set(values) - EVAL_METRIC_KEYS
        if rec["type"] == "train":
            assert len(sent) <= len(ckpt.arrays)


@pytest.mark.slow  # one in-process Flower federation (Ray start-up dominates)
def test_compare_alone_writes_alone_metrics_and_the_federation_gain(partner_run: dict[str, Any]) -> None:
    doc, run_dir = partner_run["doc"], partner_run["base"] / "run"
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    partners = on_disk["partners"]

    ratios = [p["served"]["ndcg@10"] / p["alone"]["ndcg@10"] for p in partners.values()]
    assert on_disk["federation_gain"] == pytest.approx(sum(ratios) / len(ratios))
    assert doc["federation_gain"] == on_disk["federation_gain"]
    for p in partners.values():
        assert set(p["alone"]) >= {"ndcg@10", "recall@10", "evaluated_users"}
        assert p["personalisation"]["choice"] in p["personalisation"]["val_ndcg@10"]
        assert p["served_over_alone"] == pytest.approx(p["served"]["ndcg@10"] / p["alone"]["ndcg@10"])
        assert p["served"]["ndcg@10"] >= 0.0
    assert on_disk["alone_budget"] == {"epochs": 2, "batch_size": 16, "private": False}
    assert audit_main([str(run_dir)]) == 0
    report = (run_dir / "report.html").read_text()
    assert "alone" in report


@pytest.mark.slow  # uses the federation above
def test_compare_alone_completes_a_finished_run_and_refuses_a_missing_one(partner_run: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    run_dir = partner_run["base"] / "run"
    before = json.loads((run_dir / "metrics.json").read_text())

    rc = compare_alone_main([str(run_dir), "--local-control"])
    missing = compare_alone_main([str(tmp_path / "nothing")])

    after = json.loads((run_dir / "metrics.json").read_text())
    audited = audit_run(run_dir)  # compare_alone re-signed what it added, with the run's server key
    assert rc == 0 and missing == 2
    assert audited.exit_code == 0 and "written by compare_alone" in audited.records["metrics"]["note"], \
        [str(f) for f in audited.findings]
    assert after["federation_gain"] == pytest.approx(before["federation_gain"])  # the cached alone models
    ratios = [p["served"]["ndcg@10"] / p["local_pipeline"]["ndcg@10"] for p in after["partners"].values()]
    assert after["federation_gain_over_local_pipeline"] == pytest.approx(sum(ratios) / len(ratios))


def test_compare_alone_flag_sets_the_config_key(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--config", "configs/demo.toml", "--compare-alone", "--out",
                                      str(tmp_path / "run")])

    cfg, _, _ = config_from_cli(args)

    assert cfg.federation.compare_alone


def test_maxt_bounds_its_memory_and_work_on_large_partners() -> None:
    from fedsocial.client.personalize import MAXT_BLOCK, _sign_flip_blocks

    # Prepare / Execute: the sign blocks of a 10^6-user partner, and the flips the choice draws for 2x10^5 users
    blocks = _sign_flip_blocks(10 ** 6, 999, seed=0)
    first = next(blocks)
    # Assert: each block holds at most MAXT_BLOCK signs (16 MB), and +-1 only
    assert first.size <= MAXT_BLOCK and set(np.unique(first)) <= {-1.0, 1.0}
    rng = np.random.default_rng(0)
    alone = rng.uniform(0, 1, 200_000)
    cands = {"alone": alone, "shared": alone + rng.normal(0.001, 0.1, 200_000)}
    val = {k: {"ndcg@10": float(v.mean())} for k, v in cands.items()}
    choice, safety, p = compute_safe_choice(val, cands, seed=0)
    assert p["shared"] == pytest.approx(1 / 1000)  # a clear gain (t 4.5) at 999 flips (MAXT_WORK), not 9,999
