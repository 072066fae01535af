"""Recommendation models and their common contract (RecBole-GNN style).

Every model is an ``nn.Module`` whose ``forward(batch)`` is ``calculate_loss(batch)``: the
PER-USER loss, shape [B], one DP example per user (DESIGN.md). ``full_sort_predict(batch)`` scores
every item for the users of an evaluation batch, ``predict(batch, items)`` scores given items.
``shared_parameter_names()`` lists the federated parameters (item table, item bias, history
table, category tables, MLP, aggregator); ``local_parameter_names()`` the ones that never leave a partner (social
table, per-user table).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedsocial.shared.config import ModelConfig

Batch = dict[str, torch.Tensor]


class ModelError(ValueError):
    """A model cannot be built from the given configuration or data."""


def compute_loss_per_target(pos: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each target from its score ``pos`` [B, H] and the negatives' scores ``neg`` [B, H, M].

    bce: -log s(pos) - mean_j log(1 - s(neg_j)) (the founding article's sigmoid score);
    bpr: mean_j -log s(pos - neg_j) (Rendle et al. 2009);
    softmax: sampled softmax, -log(exp(pos) / (exp(pos) + sum_j exp(neg_j))) with uniform negatives
    (a constant log-Q correction, so none is needed). ``neg_mask`` [B, M] removes accidental positives.
    """
    m = neg_mask[:, None, :]
    n_valid = m.sum(-1).clamp(min=1.0)
    if loss == "bce":
        return nn.functional.softplus(-pos) + (nn.functional.softplus(neg) * m).sum(-1) / n_valid
    if loss == "bpr":
        return (nn.functional.softplus(neg - pos[..., None]) * m).sum(-1) / n_valid
    if loss == "softmax":
        logits = torch.cat([pos[..., None], neg.masked_fill(m == 0, -1e9)], dim=-1)
        return torch.logsumexp(logits, dim=-1) - pos
    raise ModelError(f"model.loss: unknown loss {loss!r}")


MASKED = -1e9  # the score of a removed negative: exp, softplus and their gradients are exactly 0 there


def compute_loss_per_target_premasked(pos: torch.Tensor, neg: torch.Tensor, n_valid: torch.Tensor,
                                      loss: str) -> torch.Tensor:
    """``compute_loss_per_target`` for negatives' scores already at ``MASKED`` where removed; ``n_valid`` [B, 1]
    counts the kept ones (>= 1). The softmax's log-normaliser is ``logaddexp(pos, logsumexp(neg))``: no
    [B, H, M + 1] concatenation (the local refit runs it 50 times per user batch)."""
    if loss == "bce":
        return nn.functional.softplus(-pos) + nn.functional.softplus(neg).sum(-1) / n_valid
    if loss == "bpr":
        return nn.functional.softplus(neg - pos[..., None]).sum(-1) / n_valid
    if loss == "softmax":
        return torch.logaddexp(pos, torch.logsumexp(neg, dim=-1)) - pos
    raise ModelError(f"model.loss: unknown loss {loss!r}")


def compute_negative_addend(neg_bias: torch.Tensor, neg_mask: torch.Tensor) -> torch.Tensor:
    """The negatives' biases [B, M] with ``MASKED`` added where ``neg_mask`` removes one: [B, 1, M], one addend."""
    return (neg_bias + torch.where(neg_mask > 0, 0.0, MASKED))[:, None, :]


def compute_kept_negatives(neg_mask: torch.Tensor) -> torch.Tensor:
    """Kept negatives per user [B, 1], at least 1 (the divisor of the bce and bpr terms)."""
    return neg_mask.sum(-1, keepdim=True).clamp(min=1.0)


def compute_user_mean(per_target: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-user average over the user's (unpadded) targets: shape [B]."""
    return (per_target * target_mask).sum(1) / target_mask.sum(1).clamp(min=1.0)


class RecModel(nn.Module):
    """Common contract; subclasses set ``shared_prefixes`` (parameter-name prefixes that are federated)."""

    shared_prefixes: tuple[str, ...] = ()
    dp_only_prefixes: tuple[str, ...] = ()  # trained by DP fits only; a non-private fit keeps them as they are

    def __init__(self, n_users: int, n_items: int, model_cfg: ModelConfig) -> None:
        super().__init__()
        if n_users < 1 or n_items < 1:
            raise ModelError(f"need at least one user and one item, got {n_users} users, {n_items} items")
        self.n_users, self.n_items, self.model_cfg = n_users, n_items, model_cfg

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.calculate_loss(batch)

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def item_side(self) -> Any:
        """What ``score_all`` needs of the item side, computed once per evaluation pass (None: nothing)."""
        return None

    def score_all(self, batch: Batch, item_side: Any) -> torch.Tensor:
        """``full_sort_predict`` with the item side precomputed by ``item_side()`` (same scores)."""
        return self.full_sort_predict(batch)

    def predict(self, batch: Batch, items: torch.Tensor) -> torch.Tensor:
        """Scores [B, T] of ``items`` [B, T] for the users of an evaluation ``batch``."""
        return torch.gather(self.full_sort_predict(batch), 1, items)

    def shared_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(self.shared_prefixes)]

    def local_parameter_names(self) -> list[str]:
        shared = set(self.shared_parameter_names())
        return [n for n, _ in self.named_parameters() if n not in shared]

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())


def build_model(model_cfg: ModelConfig, n_users: int, n_items: int, **kwargs: Any) -> RecModel:
    """The model named by ``model_cfg.name``; ``kwargs`` (e.g. ``item_counts``) go to its constructor."""
    if model_cfg.name not in MODELS:
        raise ModelError(f"model.name: unknown model {model_cfg.name!r} (known: {', '.join(MODELS)})")
    return MODELS[model_cfg.name](n_users, n_items, model_cfg, **kwargs)


def init_embedding_(emb: nn.Embedding, std: float, generator: torch.Generator | None = None) -> None:
    """Small normal init (std 0.01 in DESIGN.md: larger left rare items with random scores)."""
    with torch.no_grad():
        emb.weight.normal_(0.0, std, generator=generator)


from fedsocial.shared.models.bpr import BPRMF  # noqa: E402  (the registry needs the base classes above)
from fedsocial.shared.models.mostpop import MostPop  # noqa: E402
from fedsocial.shared.models.social import SocialRec  # noqa: E402

MODELS: dict[str, type[RecModel]] = {"social": SocialRec, "bpr": BPRMF, "mostpop": MostPop}

__all__ = ["MODELS", "BPRMF", "Batch", "ModelError", "MostPop", "RecModel", "SocialRec", "build_model",
           "compute_kept_negatives", "compute_loss_per_target", "compute_loss_per_target_premasked",
           "compute_negative_addend", "compute_user_mean", "init_embedding_"]
