"""Local and centralized training, non-private or with user-level DP-SGD (per-user clipping in one
backward pass, shared/onepass.py; or Opacus's ghost clipping with ``privacy.clipping = "ghost"``).

One primitive, :class:`LocalTrainer`, trains one partner's model (or the whole data set, when
used centrally): ``fit`` runs a number of epochs with a fresh optimizer (and, with DP, a fresh
PrivacyEngine whose (sigma, q, steps) go to the caller's ledger). :func:`train_centralized` is
``fit`` plus validation-based early stopping (non-private) or a fixed schedule (DP).

Privacy model (DESIGN.md): one DP example = one user; the example reads only that user's record
and parameters; Poisson sampling of users with rate q = 1 / len(data_loader) (Opacus' rule,
about batch_size / n_users); per-user clipping to ``max_grad_norm`` and Gaussian noise
``noise_multiplier * max_grad_norm`` on every trained parameter (Abadi et al. 2016, with
ghost norms and book-keeping, Li et al. 2022 / Bu et al. 2023). With ``user_embedding = "local"`` p_u is
reconstructed after training from the user's own items only (billboard model: joint DP).
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsocial.shared.batching import Batch, ExampleBuilder
from fedsocial.shared.config import Config, ConfigError
from fedsocial.shared.data import SplitData
from fedsocial.shared.dp_noise import STREAMS, GaussianStreams
from fedsocial.shared.metrics import evaluate_model
from fedsocial.shared.models import RecModel, build_model
from fedsocial.shared.onepass import OnePassClipper
from fedsocial.shared.optim import make_adamw
from fedsocial.shared.privacy.popularity import (
    compute_noisy_histogram,
    compute_popularity_histogram,
    compute_release_prefix,
    uses_popularity_release,
)
from fedsocial.shared.privacy.round import compute_sample_rate as compute_sample_rate  # one definition
from fedsocial.shared.privacy.round import plan_round
from fedsocial.shared.privacy.selection import compute_planned_selection_events


class TrainerError(ValueError):
    """Training cannot run with this configuration or these parameters."""


class SelectionReleaseError(TrainerError):
    """A run's DP selection cannot be re-used (missing or altered): never drawn twice; the message names the file."""


class DeviceError(TrainerError, ConfigError):
    """``train.device`` names a device this machine does not have: the user's config, one line at the CLI."""


@dataclass
class FitResult:
    num_examples: int  # users of this partner (the DP dataset size)
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    train_loss: float
    wall_time_s: float
    epoch_losses: list[float] = field(default_factory=list)
    epsilon: float | None = None  # this call's epsilon alone (None without DP)


@dataclass
class TrainOutcome:
    metrics: dict[str, float]  # test metrics of the final (DP) or best (non-private) model
    val_metrics: dict[str, float]
    best_epoch: int
    epochs_run: int
    wall_time_s: float
    epsilon: float | None
    delta: float | None
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float | None
    history: list[dict[str, float]]
    per_epoch_time_s: float
    selected_on_validation: bool  # DP: whether validation data chose the epoch (a use of private data)
    evaluated_users: int
    state: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the evaluated model's state
    # joint scope, privacy.selection_noise_multiplier > 0: the charged DP selection (choice, noisy difference, sigma)
    selection: dict[str, Any] | None = None


class PerUserLoss(nn.Module):
    """Identity criterion over the model's per-user loss [B]; Opacus ghost clipping sets ``reduction``."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, per_user: torch.Tensor, _target: Any = None) -> torch.Tensor:
        if self.reduction == "none":
            return per_user
        return per_user.sum() if self.reduction == "sum" else per_user.mean()


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda"/"cuda:N" must be available."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"train.device: {device!r} requested but CUDA is not available")
    return torch.device(device)


def compute_embedding_norm_sample(layer: nn.Embedding, activations: list[torch.Tensor],
                                  backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """Per-example gradient norm of an embedding table for ghost clipping, without materialising it.

    Same quantity as Opacus' sampler (Li et al. 2022's ghost norm for lookups): for each example b,
    the gradient's row j is the sum of the backprops at b's positions holding index j, and the norm
    is sqrt(sum_j |row_j|^2). Opacus finds the (b, j) pairs with ``torch.unique(dim=0)``, which took
    about 0.2 s per call here (90% of a DP step); a 1-D key b * vocab + j is two orders faster.
    """
    ids = activations[0]
    ids = ids.reshape(ids.shape[0], -1)
    grads = backprops.reshape(-1, backprops.shape[-1])
    n_rows, vocab = ids.shape[0], layer.num_embeddings
    rows = torch.arange(n_rows, device=ids.device).repeat_interleave(ids.shape[1])
    keys, inverse = torch.unique(rows * vocab + ids.reshape(-1), return_inverse=True)
    summed = torch.zeros(len(keys), grads.shape[1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads)
    norm_sq = torch.zeros(n_rows, dtype=grads.dtype, device=grads.device)
    norm_sq.index_add_(0, keys // vocab, (summed * summed).sum(1))
    return {layer.weight: norm_sq.sqrt()}


def compute_dp_seeds(seed: int, noise_key: bytes | None) -> tuple[int, int]:
    """(Poisson sampling seed, noise seed) of one DP fit, unpredictable to anyone without ``noise_key``.

    DP-SGD's guarantee holds only if nobody else can regenerate the noise (or the sampled batch, which
    amplification assumes hidden; Abadi et al. 2016). A seed from the config is public: the server could
    replay the generator and subtract the noise. With the partner's secret key the draw is reproducible by
    that partner alone; without a key it comes from OS entropy.
    """
    key = os.urandom(32) if noise_key is None else noise_key
    digest = hashlib.sha256(key + b"fedsocial-dp-seed:" + str(int(seed)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1, int.from_bytes(digest[8:16], "little") >> 1  # < 2**63


def add_noise_inplace(params: Sequence[torch.Tensor], std: float, expected_batch: int,
                      generator: torch.Generator | None) -> None:
    """DP-SGD's release of the clipped sum: grad <- (grad + N(0, std^2)) / expected batch (Abadi et al. 2016).

    A parameter without a gradient gets noise alone (every trained parameter is released noised).
    """
    for p in params:
        noisy = torch.empty_like(p).normal_(0.0, std, generator=generator)  # in place: a third faster here
        if p.grad is not None:
            noisy.add_(p.grad)
        p.grad = noisy.div_(expected_batch)


def register_fast_embedding_norm_sampler() -> None:
    """Make Opacus' ghost clipping use :func:`compute_embedding_norm_sample` for ``nn.Embedding``."""
    from opacus.grad_sample.utils import register_norm_sampler

    register_norm_sampler(nn.Embedding)(compute_embedding_norm_sample)



class LocalTrainer:
    """Trains one partner's model: users local 0..n_p-1, global item ids (``split``)."""

    def __init__(self, cfg: Config, split: SplitData, device: str = "cpu", seed: int = 0,
                 popularity_prior: bool | None = None) -> None:
        """``popularity_prior``: whether the model carries the DP popularity prior; None: as ``cfg`` says
        (a non-private copy of a DP model, e.g. a partner's fine-tune, keeps the prior it started from)."""
        self.cfg, self.split, self.seed = cfg, split, seed
        self.noise_key: bytes | None = None  # a partner's secret for reproducible DP noise; None: OS entropy
        self.noise_streams = STREAMS  # the one-pass DP fit's noise streams (shared/dp_noise.py); 1: one generator
        self.device = resolve_device(device)
        torch.manual_seed(seed)
        self.builder = ExampleBuilder.from_split(split, cfg.model)
        self.model: RecModel = build_model(cfg.model, split.n_users, split.n_items,
                                           item_counts=self.builder.item_counts(),
                                           item_category=split.dataset.item_category,
                                           item_price_bin=split.dataset.item_price_bin,
                                           item_text=split.dataset.item_text,
                                           user_features=split.dataset.user_features,
                                           user_feature_sizes=split.dataset.user_feature_sizes,
                                           popularity_prior=uses_popularity_release(cfg) if popularity_prior is None
                                           else popularity_prior).to(self.device)
        self.rng = np.random.default_rng(seed)
        self._fits = 0
        if cfg.privacy.enabled and cfg.model.name == "social" and cfg.model.user_embedding == "trained":
            warnings.warn("DP with a DP-trained per-user table: its rows are mostly noise (DESIGN.md); "
                          "user_embedding = local usually does better", stacklevel=2)

    # --- parameters --------------------------------------------------------------------------
    def shared_names(self) -> list[str]:
        return self.model.shared_parameter_names()

    def get_shared(self) -> dict[str, np.ndarray]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().cpu().numpy().astype(np.float32).copy() for n in self.shared_names()}

    def set_shared(self, params: dict[str, np.ndarray]) -> None:
        own = dict(self.model.named_parameters())
        names = set(self.shared_names())
        if set(params) != names:
            raise TrainerError(f"shared parameters mismatch: missing {sorted(names - set(params))}, "
                               f"unexpected {sorted(set(params) - names)}")
        with torch.no_grad():
            for n, v in params.items():
                if tuple(v.shape) != tuple(own[n].shape):
                    raise TrainerError(f"shared parameter {n}: shape {v.shape}, expected {tuple(own[n].shape)}")
                own[n].copy_(torch.as_tensor(v, dtype=own[n].dtype))

    def set_item_popularity(self, values: np.ndarray) -> None:
        """Set the shared ``item_pop`` array (a released, noisy histogram scaled per user)."""
        pop = getattr(self.model, "item_pop", None)
        if pop is None:
            raise TrainerError("this model has no popularity prior (privacy.popularity_noise_multiplier = 0)")
        if tuple(np.shape(values)) != tuple(pop.shape):
            raise TrainerError(f"item_pop: shape {np.shape(values)}, expected {tuple(pop.shape)}")
        with torch.no_grad():
            pop.copy_(torch.as_tensor(np.asarray(values), dtype=pop.dtype))

    def get_local_state(self) -> dict[str, np.ndarray]:
        shared = set(self.shared_names())
        return {n: v.detach().cpu().numpy().copy() for n, v in self.model.state_dict().items() if n not in shared}

    def set_local_state(self, state: dict[str, np.ndarray]) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for n, v in state.items():
                if n not in own or n in self.shared_names():
                    raise TrainerError(f"local state: unknown entry {n!r}")
                if tuple(v.shape) != tuple(own[n].shape):
                    raise TrainerError(f"local state {n}: shape {v.shape}, expected {tuple(own[n].shape)}")
                own[n].copy_(torch.as_tensor(v))

    # --- training ----------------------------------------------------------------------------
    def _optimizer(self, torch_class: bool = False) -> Any:
        """The configured optimizer; ``torch_class``: a ``torch.optim.Optimizer`` (Opacus wraps only those)."""
        tc = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if tc.optimizer == "sgd":
            return torch.optim.SGD(params, lr=tc.lr, weight_decay=tc.weight_decay)
        # decoupled weight decay (AdamW, Loshchilov and Hutter 2019): with Adam's coupled L2 the
        # normalised update shrinks rarely seen rows at the full learning rate
        # fused: one kernel over all tables instead of a dozen passes per tensor (about 6x on CPU here,
        # same update rule); the tables are dense, so this is most of a step on large catalogues
        if torch_class:
            return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
        return make_adamw(params, tc.lr, tc.weight_decay)  # the same kernel without torch's compiler import

    def _batch(self, users: np.ndarray, rng: np.random.Generator) -> Batch:
        return {k: v.to(self.device) for k, v in self.builder.train_batch(users, rng).items()}

    def fit(self, epochs: int, noise_multiplier: float | None = None, rng_seed: int | None = None,
            on_epoch: Callable[[int, float], bool] | None = None, refit: bool = True) -> FitResult:
        """Train ``epochs`` epochs with a fresh optimizer; ``on_epoch(epoch, loss)`` returning True stops.

        ``refit=False`` skips the local p_u reconstruction afterwards (a partner refits against the
        new global parameters before it evaluates, and the refit starts from zero, so one made here
        against its own pre-average parameters would be discarded).

        With DP on, ``noise_multiplier`` (default ``privacy.noise_multiplier``; must be > 0 here)
        is used with a fresh PrivacyEngine; the result's (noise_multiplier, sample_rate, steps)
        is this call's accountant entry.
        """
        if epochs < 1:
            raise TrainerError(f"epochs must be >= 1, got {epochs}")
        self._fits += 1
        seed = rng_seed if rng_seed is not None else self.seed * 1_000_003 + self._fits
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        if not self.model.trainable:
            result = FitResult(self.split.n_users, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        elif self.cfg.privacy.enabled:
            result = self._fit_private(epochs, noise_multiplier, seed, rng, on_epoch)
        else:
            result = self._fit_plain(epochs, rng, on_epoch)
        if refit:
            self.refit_local()
        result.wall_time_s = time.perf_counter() - t0
        return result

    def _fit_plain(self, epochs: int, rng: np.random.Generator,
                   on_epoch: Callable[[int, float], bool] | None) -> FitResult:
        frozen = [p for name, p in self.model.named_parameters()
                  if p.requires_grad and name.startswith(self.model.dp_only_prefixes)]
        for p in frozen:  # DP-only parameters (model.learned_scale) keep their value in a non-private fit
            p.requires_grad_(False)
        try:
            return self._fit_plain_steps(epochs, rng, on_epoch)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _fit_plain_steps(self, epochs: int, rng: np.random.Generator,
                         on_epoch: Callable[[int, float], bool] | None) -> FitResult:
        opt, bs, n = self._optimizer(), self.cfg.train.batch_size, self.split.n_users
        users_all = self._example_users()
        steps, losses = 0, []
        self.model.train()
        for epoch in range(epochs):
            perm = rng.permutation(users_all)
            total = 0.0
            for start in range(0, len(perm), bs):
                per_user = self.model(self._batch(perm[start:start + bs], rng))
                loss = per_user.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += float(loss.detach()) * per_user.shape[0]
            losses.append(total / max(1, len(perm)))
            if on_epoch is not None and on_epoch(epoch, losses[-1]):
                break
        return FitResult(n, steps, 1.0, 0.0, 0.0, losses[-1], 0.0, losses)

    def _example_users(self) -> np.ndarray:
        """Users with at least one training item (the others contribute a zero loss)."""
        return np.flatnonzero(np.diff(self.builder.item_indptr) > 0)

    def _fit_private(self, epochs: int, noise_multiplier: float | None, seed: int, rng: np.random.Generator,
                     on_epoch: Callable[[int, float], bool] | None) -> FitResult:
        pc = self.cfg.privacy
        sigma = pc.noise_multiplier if noise_multiplier is None else noise_multiplier
        if sigma <= 0:
            raise TrainerError("privacy.noise_multiplier must be > 0 for a DP fit (calibrate it first)")
        if pc.clipping == "onepass" and not pc.secure_rng:
            return self._fit_private_onepass(epochs, sigma, seed, rng, on_epoch)
        return self._fit_private_ghost(epochs, sigma, seed, rng, on_epoch)

    def _fit_private_onepass(self, epochs: int, sigma: float, seed: int, rng: np.random.Generator,
                             on_epoch: Callable[[int, float], bool] | None) -> FitResult:
        """DP-SGD as Opacus runs it (Poisson rate q = 1 / ceil(n / batch), int(1 / q) steps an epoch,
        noise sigma * C on the clipped sum, divided by the expected batch int(n q)), with the clipped
        sum from one backward pass (shared/onepass.py) instead of Opacus's two."""
        from fedsocial.shared.privacy.accounting import compute_epsilon  # Opacus's analysis, not its package

        pc, n = self.cfg.privacy, self.split.n_users
        q = compute_sample_rate(n, self.cfg.train.batch_size)
        steps_per_epoch, expected = int(1 / q), max(1, int(n * q))
        sample_seed, noise_seed = compute_dp_seeds(seed, self.noise_key)
        sampler = torch.Generator().manual_seed(sample_seed)
        noise = GaussianStreams(noise_seed, self.device, self.noise_streams)  # from the secret seed, in parallel
        opt, clipper = self._optimizer(), OnePassClipper(self.model)
        losses: list[float] = []
        steps = 0
        self.model.train()
        try:
            for epoch in range(epochs):
                total, seen = 0.0, 0
                for _ in range(steps_per_epoch):
                    uids = (torch.rand(n, generator=sampler) < q).nonzero().reshape(-1)
                    opt.zero_grad(set_to_none=True)
                    per_user: torch.Tensor | None = None  # an empty Poisson batch is still a (noise-only) step
                    if uids.numel():
                        clipper.start()
                        per_user = self.model(self._batch(uids.numpy(), rng))
                        total, seen = total + float(per_user.detach().sum()), seen + uids.numel()
                    # the clipped sum + N(0, (sigma C)^2) on every trained parameter, / expected batch (onepass.py)
                    clipper.noisy_clipped_backward(per_user, pc.max_grad_norm, sigma * pc.max_grad_norm, expected,
                                                   noise)
                    opt.step()
                    steps += 1
                losses.append(total / max(1, seen))
                if on_epoch is not None and on_epoch(epoch, losses[-1]):
                    break
        finally:
            clipper.close()
            noise.close()
            opt.zero_grad(set_to_none=True)
        eps = compute_epsilon([(sigma, q, steps)], pc.target_delta, pc.accountant)
        return FitResult(n, steps, q, sigma, pc.max_grad_norm, losses[-1], 0.0, losses, eps)

    def _fit_private_ghost(self, epochs: int, sigma: float, seed: int, rng: np.random.Generator,
                           on_epoch: Callable[[int, float], bool] | None) -> FitResult:
        """Opacus's PrivacyEngine with ghost clipping (two backward passes a step); also secure_rng."""
        from opacus import PrivacyEngine

        register_fast_embedding_norm_sampler()  # here, not at import: Opacus costs ~2 s CPU to import

        pc, n = self.cfg.privacy, self.split.n_users
        # the DP dataset is every user of the partner (a user without items is a zero example)
        sample_seed, noise_seed = compute_dp_seeds(seed, self.noise_key)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)),
                                             batch_size=self.cfg.train.batch_size,
                                             generator=torch.Generator().manual_seed(sample_seed))
        noise_gen = None if pc.secure_rng else torch.Generator(device=self.device).manual_seed(noise_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' notices about secure RNG and the criterion
            engine = PrivacyEngine(accountant=pc.accountant, secure_mode=pc.secure_rng)
            gsm, opt, crit, dl = engine.make_private(
                module=self.model, optimizer=self._optimizer(torch_class=True), criterion=PerUserLoss(),
                data_loader=loader,
                noise_multiplier=sigma, max_grad_norm=pc.max_grad_norm, grad_sample_mode="ghost",
                poisson_sampling=True, noise_generator=noise_gen)
        q = 1.0 / len(dl)
        losses: list[float] = []
        self.model.train()
        with warnings.catch_warnings():
            # Opacus' second backward pass triggers a harmless PyTorch notice about full backward hooks
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            steps = self._dp_epochs(epochs, gsm, opt, crit, dl, rng, on_epoch, losses)
        eps = float(engine.get_epsilon(pc.target_delta))
        return FitResult(n, steps, q, sigma, pc.max_grad_norm, losses[-1], 0.0, losses, eps)

    def _dp_epochs(self, epochs: int, gsm: Any, opt: Any, crit: Any, dl: Any, rng: np.random.Generator,
                   on_epoch: Callable[[int, float], bool] | None, losses: list[float]) -> int:
        """The DP-SGD loop over Opacus' Poisson batches of user ids; returns the number of steps."""
        steps = 0
        try:
            for epoch in range(epochs):
                total, seen = 0.0, 0
                for (uids,) in dl:
                    opt.zero_grad(set_to_none=True)
                    if uids.numel() == 0:  # an empty Poisson batch is still a (noise-only) step
                        for p in self.model.parameters():
                            if p.requires_grad:
                                p.grad = torch.zeros_like(p)
                    else:
                        loss = crit(gsm(self._batch(uids.numpy(), rng)), None)
                        loss.backward()
                        total += float(loss.detach()) * uids.numel()
                        seen += uids.numel()
                    opt.step()
                    steps += 1
                losses.append(total / max(1, seen))
                if on_epoch is not None and on_epoch(epoch, losses[-1]):
                    break
        finally:
            gsm._close()  # remove Opacus' hooks: self.model is a plain module again
            opt.zero_grad(set_to_none=True)
        return steps

    def clipped_gradient_sum(self, max_grad_norm: float, rng_seed: int) -> tuple[dict[str, np.ndarray], float]:
        """sum over every user of clip(grad_u, C) for the shared parameters, in batches of train.batch_size;
        returns it (float64) and the mean training loss. One full-batch DP-GD step's query of the
        distributed mechanism (shared/privacy/distributed.py): the noise is added by the caller."""
        rng = np.random.default_rng(rng_seed)
        shared = set(self.shared_names())
        named = {p: n for n, p in self.model.named_parameters()}
        clipper = OnePassClipper(self.model)
        sums = {n: np.zeros(tuple(p.shape), dtype=np.float64) for n, p in self.model.named_parameters()
                if n in shared and p.requires_grad}  # the untrained shared values (item_pop) are no gradient
        users, bs, total = self._example_users(), max(1, self.cfg.train.batch_size), 0.0
        self.model.train()
        try:
            for start in range(0, len(users), bs):
                self.model.zero_grad(set_to_none=True)
                clipper.start()
                per_user = self.model(self._batch(users[start:start + bs], rng))
                total += float(per_user.detach().sum())
                clipper.clipped_backward(per_user, max_grad_norm)
                for p in clipper.params:
                    if named[p] in sums and p.grad is not None:
                        sums[named[p]] += p.grad.detach().cpu().numpy().astype(np.float64)
        finally:
            clipper.close()
            self.model.zero_grad(set_to_none=True)
        return sums, total / max(1, len(users))

    def refit_local(self) -> None:
        """Reconstruct the local p_u (user_embedding = local) from each user's own training items."""
        mc = self.cfg.model
        refit = getattr(self.model, "refit_local_users", None)
        if refit is None or mc.user_embedding != "local" or mc.local_refit_steps == 0:
            return
        rng = np.random.default_rng(self.seed + 17)
        users = self._example_users()
        for start in range(0, len(users), 1024):
            refit(self._batch(users[start:start + 1024], rng), mc.local_refit_steps, mc.local_refit_l2)

    def evaluate(self, which: str = "test") -> tuple[dict[str, float], int]:
        return evaluate_model(self.model, self.split, which, builder=self.builder, device=self.device)


@dataclass
class TrainCheckpoint:
    """A centralized run after a completed epoch: what ``fedsocial train --resume`` continues from.

    ``steps`` counts the DP steps that produced ``state`` (their (noise_multiplier, sample_rate) are
    the run's plan); steps of an epoch cut short by a crash never reach a released model, so only
    these are charged when the run resumes.
    """

    epochs_done: int
    state: dict[str, np.ndarray]
    history: list[dict[str, float]]
    best_ndcg: float
    best_epoch: int
    best_val: dict[str, float]
    best_state: dict[str, np.ndarray] | None
    noise_multiplier: float
    sample_rate: float
    steps: int


def _numpy_state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def _torch_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in state.items()}


def train_centralized(cfg: Config, split: SplitData, progress: Callable[[dict[str, Any]], None] | None = None,
                      checkpoint: Callable[[TrainCheckpoint], None] | None = None,
                      resume: TrainCheckpoint | None = None, release_dir: Path | None = None) -> TrainOutcome:
    """Train on all users; non-private: early stopping on validation NDCG@10 (best weights restored);
    DP: a fixed schedule, the final model evaluated (unless privacy.select_on_validation).

    ``checkpoint`` is called after every ``train.eval_every``-th epoch (and the last) with a
    :class:`TrainCheckpoint`; ``resume`` continues such a checkpoint: weights, history and best so far
    restored, the remaining epochs trained with a fresh optimizer (its moment estimates restart) and
    fresh sampling and noise seeds (a repeated noise draw would not be independent noise), and with
    DP the epsilon of all the steps behind the final model, under the plan's noise multiplier.
    ``release_dir`` (the run's checkpoint folder): the DP selection is saved there before it is used, and a
    resumed run re-uses it instead of drawing it again (:func:`compute_kept_selection`).
    """
    t0 = time.perf_counter()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    trainer = LocalTrainer(cfg, split, device=cfg.train.device, seed=cfg.train.seed)
    pc, private = cfg.privacy, cfg.privacy.enabled
    epochs = (pc.epochs or cfg.train.epochs) if private else cfg.train.epochs
    select = (not private) or pc.select_on_validation
    sigma, q = 0.0, 0.0
    prefix = compute_release_prefix(cfg)  # the DP popularity release, charged before training
    after = compute_planned_selection_events(cfg) if private else []  # the DP selection, after training
    if private:
        plan = plan_round(pc, n_users=split.n_users, batch_size=cfg.train.batch_size, epochs=epochs, rounds=1,
                          epochs_key="privacy.epochs or train.epochs", rounds_key="one centralized round",
                          prefix=[*prefix, *after])  # RDP composition does not depend on order
        q, sigma = plan.sample_rate, plan.noise_multiplier  # the privacy round every DP trainer plans with
        if prefix and resume is None:  # a resumed model already holds its release (item_pop is in its state)
            histogram = compute_popularity_histogram(split.train_users, split.train_items, split.n_users, split.n_items)
            noisy = compute_noisy_histogram(histogram, pc.popularity_noise_multiplier,
                                            np.random.default_rng())  # OS entropy, never the public seed
            trainer.set_item_popularity(noisy / max(1, split.n_users))
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"ndcg": -1.0, "epoch": -1, "state": None, "val": {}}
    done, steps_before = 0, 0
    if resume is not None:
        trainer.model.load_state_dict(_torch_state(resume.state))
        history, done, steps_before = [dict(r) for r in resume.history], resume.epochs_done, resume.steps
        best = {"ndcg": resume.best_ndcg, "epoch": resume.best_epoch, "val": dict(resume.best_val),
                "state": None if resume.best_state is None else _torch_state(resume.best_state)}
        sigma = resume.noise_multiplier if private else sigma
    steps_per_epoch = int(round(1.0 / q)) if private else 0
    epoch_times: list[float] = []
    last = [time.perf_counter()]

    def save(epoch: int) -> None:
        if checkpoint is not None:
            checkpoint(TrainCheckpoint(
                epochs_done=epoch, state=_numpy_state(trainer.model), history=[dict(r) for r in history],
                best_ndcg=float(best["ndcg"]), best_epoch=int(best["epoch"]), best_val=dict(best["val"]),
                best_state=None if best["state"] is None else {k: v.cpu().numpy().copy() for k, v in
                                                               best["state"].items()},
                noise_multiplier=sigma, sample_rate=q, steps=steps_before + (epoch - done) * steps_per_epoch))

    def on_epoch(epoch: int, loss: float) -> bool:
        epoch += done  # epochs are numbered over the whole run, across a resume
        epoch_times.append(time.perf_counter() - last[0])
        row: dict[str, float] = {"epoch": float(epoch + 1), "epoch_time_s": epoch_times[-1]}
        if not private:  # a DP run's loss is a non-private function of the batch: it stays unpublished
            row["loss"] = loss
        stop = False
        if select and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs):
            trainer.refit_local()
            val, _ = trainer.evaluate("val")
            row["val_ndcg@10"] = val["ndcg@10"]
            if val["ndcg@10"] > best["ndcg"]:
                best.update(ndcg=val["ndcg@10"], epoch=epoch + 1, val=val,
                            state=copy.deepcopy(trainer.model.state_dict()))
            patience = cfg.train.patience
            stop = (not private) and patience > 0 and (epoch + 1 - best["epoch"]) >= patience
        history.append(row)
        if progress is not None:
            progress(dict(row))
        if stop or (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            save(epoch + 1)
        last[0] = time.perf_counter()
        return stop

    remaining = epochs - done
    stopped = resume is not None and (remaining <= 0 or (not private and cfg.train.patience > 0 and
                                                         done - best["epoch"] >= cfg.train.patience))
    if stopped:  # the checkpointed run had already finished or early-stopped
        fit = FitResult(split.n_users, 0, q, sigma, pc.max_grad_norm if private else 0.0, 0.0, 0.0)
        trainer.refit_local()
    else:
        seed = None if resume is None else (cfg.train.seed * 1_000_003 + 7919) * 1_000_003 + done
        fit = trainer.fit(remaining, noise_multiplier=sigma if private else None, on_epoch=on_epoch, rng_seed=seed)
    steps_total = steps_before + fit.steps
    if private and (resume is not None or prefix or after):
        from fedsocial.shared.privacy.accounting import compute_epsilon

        events = [*prefix, *([(sigma, q, steps_total)] if steps_total else []), *after]
        fit.epsilon = compute_epsilon(events, pc.target_delta, pc.accountant) if events else 0.0
    if select and best["state"] is not None:
        trainer.model.load_state_dict(best["state"])
        val = best["val"]
    else:
        val, _ = trainer.evaluate("val")
    test, n_eval = trainer.evaluate("test")
    selection = (compute_kept_selection(trainer, split, pc.selection_noise_multiplier, release_dir, epochs)
                 if after else None)
    if selection is not None and selection["choice"] != "model":  # what this training serves: another candidate
        from fedsocial.shared.metrics import evaluate_model
        from fedsocial.shared.models.prior import candidate_model

        served = candidate_model(selection["choice"], trainer.model)
        val = evaluate_model(served, split, "val", builder=trainer.builder, device=trainer.device)[0]
        test, n_eval = evaluate_model(served, split, "test", builder=trainer.builder, device=trainer.device)
    best_epoch = best["epoch"] if select and best["epoch"] > 0 else len(history)
    return TrainOutcome(
        metrics=test, val_metrics=val, best_epoch=best_epoch, epochs_run=len(history),
        wall_time_s=time.perf_counter() - t0,
        epsilon=fit.epsilon if private else None, delta=pc.target_delta if private else None,
        noise_multiplier=fit.noise_multiplier, sample_rate=fit.sample_rate, steps=steps_total,
        max_grad_norm=pc.max_grad_norm if private else None, history=history,
        per_epoch_time_s=float(np.mean(epoch_times)) if epoch_times else 0.0,
        selected_on_validation=bool(private and select), evaluated_users=n_eval,
        state={k: v.detach().cpu().numpy().copy() for k, v in trainer.model.state_dict().items()},
        selection=selection)


def compute_selection_per_user(trainer: LocalTrainer, split: SplitData) -> dict[str, np.ndarray]:
    """Each validation user's NDCG@10 under each selection candidate of the config (the trained model; the prior
    alone; their product: shared/models/prior.py), the same users in the same order, in one ranking pass: what
    the DP selection sums."""
    from fedsocial.shared.metrics import evaluate_models_per_user
    from fedsocial.shared.models.prior import candidate_model
    from fedsocial.shared.privacy.selection import selection_candidates

    models = {name: candidate_model(name, trainer.model) for name in selection_candidates(trainer.cfg)}
    done = evaluate_models_per_user(models, split, "val", builder=trainer.builder, device=trainer.device)
    return {name: done[name][2] for name in models}


def compute_kept_selection(trainer: LocalTrainer, split: SplitData, sigma: float, release_dir: Path | None,
                           round_: int) -> dict[str, Any]:
    """The DP selection of a centralized run, drawn once per run folder: a release saved in ``release_dir``
    (``selection/round_XXXX.json``, 0600, before it is used) is re-used by a resumed run; an altered one is
    refused (a second draw would be an uncharged release; a finished run whose record is missing is refused
    earlier, simulations/train_checkpoint.py). Without ``release_dir`` (library callers) every call draws."""
    from fedsocial.shared.privacy.selection import (
        compute_selection_release,
        load_selection_release,
        save_selection_release,
        selection_candidates,
        selection_release_path,
    )

    if release_dir is None:
        return compute_dp_selection(trainer, split, sigma)
    path = selection_release_path(release_dir, round_)
    saved = load_selection_release(release_dir, round_)
    if saved is None and path.exists():
        raise SelectionReleaseError(f"{path}: the DP selection of this run was drawn, but its record is altered or "
                                    "unreadable; refusing a second draw (train into a new --out)")
    if saved is not None:
        if saved.get("sigma") != float(sigma):
            raise SelectionReleaseError(f"{path}: drawn at sigma {saved.get('sigma')!r}, not the config's {sigma:g}")
        if tuple(saved["candidates"]) != selection_candidates(trainer.cfg):
            raise SelectionReleaseError(f"{path}: drawn among {','.join(saved['candidates'])}, not the config's "
                                        f"privacy.selection_candidates = {trainer.cfg.privacy.selection_candidates!r}")
        drawn: dict[str, Any] = {"choice": saved["choice"], "noisy_differences": list(saved["noisy_differences"]),
                                 "noise_multiplier": float(sigma), "evaluated_users": int(saved["evaluated_users"]),
                                 "candidates": list(saved["candidates"])}
        return drawn
    drawn = compute_dp_selection(trainer, split, sigma)
    save_selection_release(release_dir, compute_selection_release(round_, sigma, np.asarray(
        drawn["noisy_differences"]), drawn["evaluated_users"], selection_candidates(trainer.cfg)))
    return drawn


def compute_dp_selection(trainer: LocalTrainer, split: SplitData, sigma: float) -> dict[str, Any]:
    """The DP choice among the config's candidates (the trained model, its prior alone, their product:
    shared/privacy/selection.py) on the validation users: the Gaussian mechanism on the differences of the
    NDCG@10 sums to the model's (noise from OS entropy), the best by them served.
    The caller charges the event ``(sigma, 1, 1)`` in the run's epsilon."""
    from fedsocial.shared.privacy.selection import (
        compute_noisy_choice,
        compute_noisy_differences,
        compute_selection_differences,
        selection_candidates,
    )

    candidates = selection_candidates(trainer.cfg)
    per_user = compute_selection_per_user(trainer, split)
    noisy = compute_noisy_differences(compute_selection_differences(per_user, candidates), sigma,
                                      np.random.default_rng(), candidates)  # OS entropy, never the seed
    return {"choice": compute_noisy_choice(noisy, candidates), "noisy_differences": [float(x) for x in noisy],
            "noise_multiplier": float(sigma), "evaluated_users": int(len(per_user["model"])),
            "candidates": list(candidates)}
