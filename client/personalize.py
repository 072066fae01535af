"""``privacy.scope = "partner"``: the model a partner serves = DP shared parameters + local, non-private learning.

In ``partner`` scope everything that leaves a partner stays user-level DP (DESIGN.md, two scopes), but
the model it serves to its *own* users may also learn from its own users' data without DP, as any
platform's recommender does (the partner holds that data anyway). What is learnt here:

* ``shared``: the federation's DP shared parameters with the local p_u refit (the joint-scope model);
* ``alone``: a model trained by the partner alone, non-private, on its own data, with the alone budget
  (rounds x local_epochs epochs at the partner's batch size, early stopping on its own validation data);
* ``finetune``: a separate copy of the shared model fine-tuned, non-private, on the partner's own data
  (personalised FL by local fine-tuning; Wang et al. 2019, "Federated evaluation of on-device
  personalization"), the epoch chosen on validation;
* ``mix:<base>:<alpha>``: a mixture of per-user standardised scores, alpha x base + (1 - alpha) x alone
  (the model-mixture view of personalisation; Mansour et al. 2020, "Three approaches for
  personalization with applications to federated learning").

The served candidate is the challenger (any candidate but ``alone``) with the best validation NDCG@10 of
the partner's own users among those that beat ``alone`` on the same validation users significantly (ties
go to the earlier candidate, ``shared`` first), else ``alone``; so on validation data it is never below
``alone``. "Significantly" is a familywise one-sided test at level ``SAFE_LEVEL`` over all challengers
together: step-down max-T over sign-flipped per-user differences (:func:`compute_maxt_pvalues`, which replaced a
Bonferroni z-test: the challengers are mixtures of the same models, strongly correlated, and Bonferroni
paid for eight independent ones). A margin inside the validation noise is no reason to serve something
else (measured on Ciao, 1,443 users: a 5 % validation margin became a 15 % test loss).
All of it runs *after* the DP round, on copies: nothing here writes the round snapshots that
feed the next DP update, and nothing returns through the wire except the scalar test metrics the joint
scope reports too. The local models are kept under ``STATE_DIR/personal/`` (mode 0600).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsocial.shared.batching import ExampleBuilder
from fedsocial.shared.config import Config
from fedsocial.shared.data import SplitData
from fedsocial.shared.fileio import save_npz_atomic, write_json_atomic
from fedsocial.shared.metrics import evaluate_model, evaluate_models_per_user
from fedsocial.shared.models import RecModel

log = logging.getLogger("fedsocial.client")

PERSONAL_DIR = "personal"
MIX_ALPHAS = (0.25, 0.5, 0.75)
SAFE_LEVEL = 0.05  # compute_maxt_pvalues: false-replacement rate of alone, over all candidates together
MAXT_FLIPS = 9999  # sign flips drawn for the max-T null (Monte-Carlo error of a p near 0.05: 0.002)
MAXT_WORK = 10 ** 8  # flips x users at most (then fewer flips, at least 999: valid p, a little less power)
MAXT_BLOCK = 2 ** 21  # signs per block of flips


def compute_alone_epochs(cfg: Config) -> int:
    """The alone budget in epochs: what a partner trains in the federation (rounds x local_epochs)."""
    return cfg.federation.rounds * cfg.federation.local_epochs


def compute_alone_config(cfg: Config) -> Config:
    """A partner alone: non-private, the partner's batch size, at most the federation's epochs.

    Same model, loss and learning rate as the federation; early stopping on the partner's own
    validation data (``train.patience``), as a platform training by itself would.
    """
    size = cfg.federation.local_batch_size or cfg.train.batch_size
    return (cfg.replace("privacy", enabled=False)
            .replace("train", epochs=compute_alone_epochs(cfg), batch_size=size))


def compute_personal_epochs(cfg: Config) -> int:
    """Fine-tuning epochs: ``federation.personal_epochs``, 0 meaning the alone budget."""
    return cfg.federation.personal_epochs or compute_alone_epochs(cfg)


def compute_standardised_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-user (row) z-scores, so that two models' score scales can be mixed (ranks are unchanged)."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    # torch.std's (n - 1) estimate as a vectorised norm of the centred row (torch.std is 4x slower on CPU)
    std = torch.linalg.vector_norm(centred, dim=1, keepdim=True) / math.sqrt(max(1, scores.shape[1] - 1))
    return centred.div_(std.clamp(min=1e-12))


def choose_on_validation(val_ndcg: dict[str, float]) -> str:
    """The candidate with the highest validation NDCG@10; ties go to the earliest (insertion order)."""
    if not val_ndcg:
        raise ValueError("no personalisation candidate to choose from")
    best = next(iter(val_ndcg))
    for name, value in val_ndcg.items():
        if value > val_ndcg[best]:
            best = name
    return best


def compute_studentised_means(means: np.ndarray, sum_squares: np.ndarray, n: int) -> np.ndarray:
    """One-sample t statistics sqrt(n) mean / sd of columns whose means and sums of squares are given.

    Sign flips leave each column's sum of squares unchanged, so flipped t statistics need only the flipped
    means. A zero-variance column: t = 0 for a zero mean, +-inf otherwise (a constant margin)."""
    var = np.maximum((sum_squares - n * means ** 2) / (n - 1), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = means * np.sqrt(n) / np.sqrt(var)
    constant = np.where(means > 0, np.inf, np.where(means < 0, -np.inf, 0.0))
    return np.where(var > 0, t, constant).astype(np.float64)


def _is_exact(n: int, n_flips: int) -> bool:
    """Whether all 2^n sign vectors are at most ``n_flips + 1`` (then they are enumerated, an exact test)."""
    return n < 63 and (1 << n) <= n_flips + 1


def _sign_flip_blocks(n: int, n_flips: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of +-1 rows of length ``n``: all 2^n when that is at most ``n_flips + 1`` (an exact test,
    the identity among them), else ``n_flips`` drawn at random; at most ``MAXT_BLOCK`` signs a block."""
    if _is_exact(n, n_flips):
        codes = np.arange(1 << n)[:, None] >> np.arange(n)[None, :] & 1
        yield 1.0 - 2.0 * codes
        return
    rng = np.random.default_rng(seed)
    block = max(1, min(512, MAXT_BLOCK // n))  # 16 MB of float64 signs whatever the partner's size
    for start in range(0, n_flips, block):
        yield 1.0 - 2.0 * rng.integers(0, 2, (min(block, n_flips - start), n))


def compute_maxt_pvalues(diffs: np.ndarray, n_flips: int = MAXT_FLIPS, seed: int = 0) -> tuple[np.ndarray, float]:
    """One-sided familywise-adjusted p-values of H_c "challenger c is no better than the baseline", and the
    critical t at ``SAFE_LEVEL``; ``diffs[u, c]`` = challenger c's validation NDCG@10 of user u - baseline's.

    Step-down max-T (Westfall & Young 1993, "Resampling-Based Multiple Testing"): the challengers in
    decreasing order of their t; the j-th is compared with the null law of the maximum t over itself and
    those after it, drawn by flipping the sign of each user's whole row (the users' difference vectors
    symmetric about zero under the null; sign flips: Nichols & Holmes 2002, "Nonparametric permutation tests
    for functional neuroimaging"), which keeps the challengers' correlation, so correlated challengers pay far
    less than Bonferroni's correction; adjusted p-values are made monotone down the order. Monte-Carlo
    p = (1 + #{max-T* >= t}) / (n_flips + 1) (valid at every ``n_flips``); exact enumeration for at most 13
    users. The critical t is the first step's (the maximum over all). Fewer than two users: every p is 1."""
    d = np.asarray(diffs, dtype=np.float64)
    n, c = d.shape
    if n < 2:
        return np.ones(c), float("inf")
    sum_squares = (d ** 2).sum(axis=0)
    observed = compute_studentised_means(d.mean(axis=0), sum_squares, n)
    order = np.argsort(-observed, kind="stable")  # the largest t first
    flipped = np.concatenate([compute_studentised_means(signs @ d / n, sum_squares, n)[:, order]
                              for signs in _sign_flip_blocks(n, n_flips, seed)])
    suffix_max = np.maximum.accumulate(flipped[:, ::-1], axis=1)[:, ::-1]  # column j: max over steps j, j+1, ...
    t_sorted = observed[order]
    tol = 1e-9 * np.maximum(1.0, np.abs(np.where(np.isfinite(t_sorted), t_sorted, 0.0)))  # float noise is a tie
    exceed = (suffix_max >= t_sorted[None, :] - tol).sum(axis=0)
    p_sorted = exceed / len(flipped) if _is_exact(n, n_flips) else (1.0 + exceed) / (len(flipped) + 1.0)
    p = np.empty(c)
    p[order] = np.minimum(np.maximum.accumulate(p_sorted), 1.0)
    return p, float(np.quantile(suffix_max[:, 0], 1.0 - SAFE_LEVEL))


def compute_safe_choice(val: dict[str, dict[str, float]], per_user: dict[str, np.ndarray], seed: int,
                        baseline: str = "alone", n_flips: int = MAXT_FLIPS,
                        ) -> tuple[str, dict[str, float], dict[str, float]]:
    """The served candidate: the best validation NDCG@10 among the challengers that beat ``baseline`` at
    familywise level ``SAFE_LEVEL`` (:func:`compute_maxt_pvalues`), else ``baseline``.

    Returns (choice, the record of the challenger with the best validation NDCG@10 — margin over the
    baseline, its standard error, t, critical t, adjusted p — and every challenger's adjusted p)."""
    challengers = [name for name in val if name != baseline]
    if not challengers:
        return baseline, {}, {}
    diffs = np.stack([np.asarray(per_user[name], np.float64) - np.asarray(per_user[baseline], np.float64)
                      for name in challengers], axis=1)
    flips = min(n_flips, max(999, MAXT_WORK // max(1, len(diffs))))  # 200k users: 999 flips, about 9 s
    p, critical = compute_maxt_pvalues(diffs, flips, seed)
    adjusted = {name: float(pc) for name, pc in zip(challengers, p, strict=True)}
    passed = {name: val[name]["ndcg@10"] for name in challengers if adjusted[name] <= SAFE_LEVEL}
    choice = choose_on_validation(passed) if passed else baseline
    top = choose_on_validation({name: val[name]["ndcg@10"] for name in challengers})
    d = diffs[:, challengers.index(top)]
    stderr = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    margin = float(d.mean()) if len(d) else 0.0
    t = margin / stderr if stderr > 0 else (float("inf") if margin > 0 else 0.0)
    return choice, {"margin": margin, "stderr": stderr, "t": t, "critical_t": critical, "p": adjusted[top]}, adjusted


class ScoreMemo:
    """Each model's scores of the latest evaluation batch, raw and standardised. The candidates are the three
    models and mixtures of them, so in one ranking pass (:func:`shared.metrics.evaluate_models_per_user`, which
    hands every candidate the same batch object) each model scores a chunk once instead of once per candidate."""

    def __init__(self) -> None:
        self._batch: dict[str, torch.Tensor] | None = None  # held, so that its identity cannot be reused
        self._raw: dict[int, torch.Tensor] = {}
        self._z: dict[int, torch.Tensor] = {}
        self._sides: dict[int, tuple[RecModel, Any]] = {}  # per pass: the model held with its item side

    def side(self, model: RecModel) -> Any:
        """``model.item_side()``, computed once for every candidate that scores with ``model``."""
        if id(model) not in self._sides:
            self._sides[id(model)] = (model, model.item_side())
        return self._sides[id(model)][1]

    def raw(self, model: RecModel, batch: dict[str, torch.Tensor], side: Any) -> torch.Tensor:
        """``model``'s scores of ``batch`` (shared: callers that write into them must copy)."""
        if batch is not self._batch:
            self._batch, self._raw, self._z = batch, {}, {}
        key = id(model)
        if key not in self._raw:
            self._raw[key] = model.score_all(batch, side).float()
        return self._raw[key]

    def standardised(self, model: RecModel, batch: dict[str, torch.Tensor], side: Any) -> torch.Tensor:
        raw = self.raw(model, batch, side)
        key = id(model)
        if key not in self._z:
            self._z[key] = compute_standardised_scores(raw)
        return self._z[key]


class MemoScored(RecModel):
    """``model`` scored through a :class:`ScoreMemo` (a fresh copy each call: the evaluation masks in place)."""

    def __init__(self, model: RecModel, memo: ScoreMemo) -> None:
        super().__init__(model.n_users, model.n_items, model.model_cfg)
        self.inner, self.memo = model, memo
        self.train(model.training)  # the evaluation restores this mode on the inner model too

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.inner.full_sort_predict(batch)

    def item_side(self) -> Any:
        return self.memo.side(self.inner)

    def score_all(self, batch: dict[str, torch.Tensor], item_side: Any) -> torch.Tensor:
        return self.memo.raw(self.inner, batch, item_side).clone()


class ScoreMixture(RecModel):
    """alpha x z(base scores) + (1 - alpha) x z(other scores): both models read the same eval batch."""

    def __init__(self, base: RecModel, other: RecModel, alpha: float, memo: ScoreMemo | None = None) -> None:
        super().__init__(base.n_users, base.n_items, base.model_cfg)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"mixture weight alpha must be in [0, 1], got {alpha}")
        self.base, self.other, self.alpha = base, other, float(alpha)
        self.memo = memo  # the candidates' shared scores during one ranking pass (None: scored afresh)

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.score_all(batch, self.item_side())

    def item_side(self) -> tuple[Any, Any]:  # once per pass, not once per chunk
        if self.memo is not None:
            return self.memo.side(self.base), self.memo.side(self.other)
        return self.base.item_side(), self.other.item_side()

    def score_all(self, batch: dict[str, torch.Tensor], item_side: Any) -> torch.Tensor:
        if self.memo is not None:
            a = self.memo.standardised(self.base, batch, item_side[0])
            b = self.memo.standardised(self.other, batch, item_side[1])
        else:
            a = compute_standardised_scores(self.base.score_all(batch, item_side[0]).float())
            b = compute_standardised_scores(self.other.score_all(batch, item_side[1]).float())
        return torch.lerp(b, a, self.alpha)  # alpha a + (1 - alpha) b in one pass


@dataclass
class Personalisation:
    """What a partner serves in partner scope, and the measurements behind the choice."""

    choice: str
    model: RecModel
    val: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> validation metrics
    test: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> test metrics
    evaluated_users: int = 0
    finetune_epoch: int = 0
    best_on_validation: str = ""  # the highest validation NDCG@10 (served only if significantly above alone)
    safety: dict[str, float] = field(default_factory=dict)  # compute_safe_choice's margin, stderr, t, critical t, p
    val_per_user: dict[str, np.ndarray] = field(default_factory=dict)  # candidate -> each validation user's NDCG@10
    p_adjusted: dict[str, float] = field(default_factory=dict)  # challenger -> its max-T familywise p-value

    def record(self) -> dict[str, Any]:
        return {"choice": self.choice, "finetune_epoch": self.finetune_epoch, "evaluated_users": self.evaluated_users,
                "best_on_validation": self.best_on_validation, "safety": self.safety,
                "p_adjusted": self.p_adjusted, "val": self.val, "test": self.test}


def _config_key(cfg: Config, split: SplitData) -> str:
    text = json.dumps([cfg.to_dict(), int(split.n_users), int(split.n_items)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_alone_cache(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a cached alone model (``STATE_DIR/personal/alone.npz``), its config key under ``__key__``;
    :class:`client.state.StateError` naming the file when it is torn, replaced or not such a cache."""
    from fedsocial.client.state import StateError, load_npz

    saved = load_npz(path)  # StateError naming the file when it is not an npz archive
    if "__key__" not in saved or saved["__key__"].shape != () or saved["__key__"].dtype.kind != "U":
        raise StateError(f"{path}: not a cache of the partner's alone model (no config key); delete it and the "
                         "alone model is trained again")
    return saved


def _load_alone_cache_inplace(model: RecModel, path: Path, key: str) -> bool:
    """Load the cached alone model into ``model`` if ``path`` is a readable cache of this config (``key``).

    A cache of another config is stale (False, silently); one that is torn, replaced or does not fit the model
    is trained again with a warning naming it: it is a local, non-private cache, so retraining costs time,
    never privacy, where a raw numpy or zipfile error would stop the partner."""
    from fedsocial.client.state import StateError

    try:
        saved = read_alone_cache(path)
        if str(saved["__key__"]) != key:
            return False
        model.load_state_dict({k: torch.as_tensor(v) for k, v in saved.items() if k != "__key__"})
    except (StateError, RuntimeError, KeyError) as exc:  # load_state_dict: missing, unexpected or mis-shaped
        log.warning("%s: unusable cache of the alone model, training it again (%s)", path,
                    str(exc).splitlines()[0][:300])
        return False
    return True


def train_alone_model(cfg: Config, split: SplitData, cache_dir: Path | None = None) -> tuple[RecModel, Any]:
    """The partner's alone model (see :func:`compute_alone_config`); cached in ``cache_dir`` by config.

    Returns (model, outcome or None when loaded from the cache)."""
    from fedsocial.shared.trainer import LocalTrainer, train_centralized

    alone_cfg = compute_alone_config(cfg)
    trainer = LocalTrainer(alone_cfg, split, device="cpu", seed=alone_cfg.train.seed)
    key = _config_key(alone_cfg, split)
    path = None if cache_dir is None else cache_dir / "alone.npz"
    if path is not None and path.is_file() and _load_alone_cache_inplace(trainer.model, path, key):
        return trainer.model, None
    outcome = train_centralized(alone_cfg, split)
    trainer.model.load_state_dict({k: torch.as_tensor(v) for k, v in outcome.state.items()})
    if path is not None:
        save_npz_atomic(path, {**outcome.state, "__key__": np.array(key)}, mode=0o600)
    return trainer.model, outcome


def fine_tune(cfg: Config, split: SplitData, start: RecModel, epochs: int, seed: int) -> tuple[RecModel, int]:
    """A separate copy of ``start`` trained non-privately on the partner's data; best validation epoch kept.

    Epoch 0 (``start`` as is) is a candidate, so the result is never below ``start`` on validation.
    """
    from fedsocial.shared.trainer import LocalTrainer

    tuned_cfg = compute_alone_config(cfg)
    trainer = LocalTrainer(tuned_cfg, split, device="cpu", seed=seed,
                           popularity_prior=getattr(start, "item_pop", None) is not None)  # keeps the DP prior
    trainer.model.load_state_dict(copy.deepcopy(start.state_dict()))
    best: dict[str, Any] = {"ndcg": evaluate_model(trainer.model, split, "val", builder=trainer.builder)[0]["ndcg@10"],
                            "epoch": 0, "state": copy.deepcopy(trainer.model.state_dict())}
    every, patience = tuned_cfg.train.eval_every, tuned_cfg.train.patience

    def on_epoch(epoch: int, _loss: float) -> bool:
        if (epoch + 1) % every and epoch + 1 != epochs:
            return False
        trainer.refit_local()
        ndcg = trainer.evaluate("val")[0]["ndcg@10"]
        if ndcg > best["ndcg"]:
            best.update(ndcg=ndcg, epoch=epoch + 1, state=copy.deepcopy(trainer.model.state_dict()))
        return patience > 0 and epoch + 1 - int(best["epoch"]) >= patience

    trainer.fit(epochs, rng_seed=seed, on_epoch=on_epoch, refit=False)
    trainer.model.load_state_dict(best["state"])
    return trainer.model, int(best["epoch"])


def personalise(cfg: Config, split: SplitData, shared: RecModel, state_dir: Path | None, seed: int,
                alone: RecModel | None = None) -> Personalisation:
    """Build the candidates on copies of ``shared`` (the global DP model with p_u refitted) and choose one.

    ``shared`` itself is not modified. Test metrics of every candidate are measured for the record
    (the benchmark's shared-only and alone columns); only validation metrics drive the choice.
    ``alone``: the partner's alone model when already at hand (else trained or loaded from the cache).
    """
    cache = None if state_dir is None else state_dir / PERSONAL_DIR
    if alone is None:
        alone, _ = train_alone_model(cfg, split, cache)
    tuned, tuned_epoch = fine_tune(cfg, split, shared, compute_personal_epochs(cfg), seed)
    models: dict[str, RecModel] = {"shared": shared, "alone": alone, "finetune": tuned}
    for base in ("shared", "finetune"):
        for alpha in MIX_ALPHAS:
            models[f"mix:{base}:{alpha:g}"] = ScoreMixture(models[base], alone, alpha)
    builder = ExampleBuilder.from_split(split, cfg.model)  # the same examples for every candidate
    val, per_user = {}, {}  # each candidate's metrics and each user's NDCG@10
    for name, (metrics, _, rows) in evaluate_candidates(models, split, "val", builder).items():
        val[name], per_user[name] = metrics, rows
    best = choose_on_validation({name: v["ndcg@10"] for name, v in val.items()})
    choice, safety, adjusted = compute_safe_choice(val, per_user, seed)
    tested = evaluate_candidates(models, split, "test", builder)
    test = {name: metrics for name, (metrics, _, _) in tested.items()}
    out = Personalisation(choice, models[choice], val, test, tested[choice][1], tuned_epoch, best, safety, per_user,
                          adjusted)
    if cache is not None:
        save_npz_atomic(cache / "finetune.npz", {k: v.detach().cpu().numpy() for k, v in tuned.state_dict().items()},
                        mode=0o600)
    return out


def evaluate_candidates(models: dict[str, RecModel], split: SplitData, which: str, builder: ExampleBuilder,
                        batch_size: int = 0) -> dict[str, tuple[dict[str, float], int, np.ndarray]]:
    """Every candidate's (metrics, users, per-user NDCG@10) on ``which`` in one ranking pass: the three models score
    each chunk once, the mixtures reuse those scores (:class:`ScoreMemo`); the same figures as one pass each."""
    memo = ScoreMemo()
    scored: dict[str, RecModel] = {}
    for name, m in models.items():
        scored[name] = (ScoreMixture(m.base, m.other, m.alpha, memo) if isinstance(m, ScoreMixture)
                        else MemoScored(m, memo))
    return evaluate_models_per_user(scored, split, which, builder=builder, batch_size=batch_size)


def evaluate_personalised(cfg: Config, split: SplitData, shared: RecModel, state_dir: Path, round_: int,
                          seed: int) -> tuple[dict[str, float], int]:
    """Partner scope's evaluate: the served candidate's test metrics; the record stays on the partner's disk."""
    result = personalise(cfg, split, shared, state_dir, seed)
    write_json_atomic(state_dir / PERSONAL_DIR / f"round_{round_:04d}.json", {"round": round_, **result.record()})
    # each candidate's per-user validation NDCG@10, same user order: what another choice rule can be studied on
    save_npz_atomic(state_dir / PERSONAL_DIR / f"round_{round_:04d}_val_ndcg.npz",
                    {name: np.asarray(v, dtype=np.float64) for name, v in result.val_per_user.items()}, mode=0o600)
    return dict(result.test[result.choice]), result.evaluated_users
