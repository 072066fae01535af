"""BPR-MF: matrix factorisation trained with Bayesian Personalised Ranking.

Rendle, Freudenthaler, Gantner and Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from
Implicit Feedback", UAI 2009. Score(u, i) = p_u . q_i; one example per user covers at most H of
the user's training items; with the BPR loss each is paired with its own uniform negative (set
num_negatives >= max_targets), with the other losses each is scored against all the negatives.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsocial.shared.config import ModelConfig
from fedsocial.shared.models import Batch, RecModel, compute_loss_per_target, compute_user_mean, init_embedding_


class BPRMF(RecModel):
    """p_u . q_i; the user table is local to a partner, the item table is shared."""

    shared_prefixes = ("item_emb.",)

    def __init__(self, n_users: int, n_items: int, model_cfg: ModelConfig, **_: object) -> None:
        super().__init__(n_users, n_items, model_cfg)
        self.user_emb = nn.Embedding(n_users, model_cfg.dim)
        self.item_emb = nn.Embedding(n_items, model_cfg.dim)
        init_embedding_(self.user_emb, model_cfg.init_std)
        init_embedding_(self.item_emb, model_cfg.init_std)

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        tg, neg = batch["targets"], batch["negatives"]
        p = self.user_emb(batch["users"])  # each table is called once per forward (Opacus ghost mode)
        q = self.item_emb(torch.cat([tg, neg], dim=1))
        q_t, q_n = q[:, : tg.shape[1]], q[:, tg.shape[1]:]
        pos = torch.einsum("bd,bhd->bh", p, q_t)
        neg = torch.einsum("bd,bmd->bm", p, q_n)
        if self.model_cfg.loss == "bpr":
            # Rendle et al.'s sampling: one uniform negative per (user, positive) pair; target t
            # takes negative t mod M, so num_negatives >= max_targets gives independent pairs
            pick = torch.arange(tg.shape[1], device=tg.device) % neg.shape[1]
            valid = batch["target_mask"] * batch["neg_mask"][:, pick]
            per_pair = nn.functional.softplus(neg[:, pick] - pos)
            return compute_user_mean(per_pair, valid)
        neg_s = neg[:, None, :].expand(-1, tg.shape[1], -1)
        per_target = compute_loss_per_target(pos, neg_s, batch["neg_mask"], self.model_cfg.loss)
        return compute_user_mean(per_target, batch["target_mask"])

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        return self.user_emb.weight[batch["users"]] @ self.item_emb.weight.T
