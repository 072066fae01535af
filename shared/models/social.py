"""The fedsocial model: behaviour bag + social aggregation + residual MLP (DESIGN.md, "The model").

Structure after TrustSVD (Guo, Zhang and Yorke-Smith, AAAI 2015), FISM (Kabbur, Ning and Karypis,
KDD 2013) and SVD++ (Koren, KDD 2008), with the founding article's MLP as a residual refinement:

    b_u = sum_{j in bag(u)} y_j / sqrt(|bag(u)|)          (history table y; a target leaves the bag)
    r_u = sum_{v in N_K(u)} w_uv s_v                       (social table s, mean | gcn | attention)
    h_u = b_u + r_u (+ p_u) + MLP([b_u ; r_u (; p_u)])     (MLP output layer starts at zero)
    score(u, i) = h_u . q_i + c_i

Inside a training example the user's vector is computed from the user's own record (items,
out-neighbour ids) and parameters only. Each embedding table is called exactly once per forward
with concatenated indices and padding is handled by masks, as Opacus ghost clipping requires.
With ``user_embedding = "local"`` p_u is not a parameter: it is a buffer refitted per user
against the frozen shared parameters (``refit_local_users``), added only to that user's scores.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.config import ModelConfig
from shared.models import Batch, RecModel, compute_loss_per_target, compute_user_mean, init_embedding_


class SocialRec(RecModel):
    shared_prefixes = ("item_emb.", "item_bias.", "hist_emb.", "mlp.", "att.")
    local_user: torch.Tensor

    def __init__(self, n_users: int, n_items: int, model_cfg: ModelConfig, **_: object) -> None:
        super().__init__(n_users, n_items, model_cfg)
        d, c = model_cfg.dim, model_cfg
        self.item_emb = nn.Embedding(n_items, d)
        self.item_bias = nn.Embedding(n_items, 1)
        init_embedding_(self.item_emb, c.init_std)
        nn.init.zeros_(self.item_bias.weight)
        self.hist_emb = nn.Embedding(n_items, d) if c.use_history else None
        self.social_emb = nn.Embedding(n_users, d) if c.use_social else None
        self.user_emb = nn.Embedding(n_users, d) if c.user_embedding == "trained" else None
        for emb in (self.hist_emb, self.social_emb, self.user_emb):
            if emb is not None:
                init_embedding_(emb, c.init_std)
        # local p_u: not trained by DP-SGD, refitted on the user's own items (buffer, not a parameter)
        self.register_buffer("local_user", torch.zeros(n_users if c.user_embedding == "local" else 0, d))
        self.att = (nn.Sequential(nn.Linear(2 * d, d), nn.Tanh(), nn.Linear(d, 1))
                    if c.use_social and c.aggregator == "attention" else None)
        n_parts = int(c.use_history) + int(c.use_social) + int(c.user_embedding == "trained")
        self.mlp = None
        if c.use_mlp and n_parts > 0:
            out = nn.Linear(c.mlp_hidden, d)
            nn.init.zeros_(out.weight)  # residual: start as the dot-product model
            nn.init.zeros_(out.bias)
            self.mlp = nn.Sequential(nn.Linear(n_parts * d, c.mlp_hidden), nn.ReLU(), out)

    # --- user tower -------------------------------------------------------------------------
    def _social(self, batch: Batch, bag_query: torch.Tensor | None) -> torch.Tensor | None:
        """r_u [B, d] from the user's sampled out-neighbours' social embeddings."""
        if self.social_emb is None:
            return None
        mask = batch["nbr_mask"]
        s = self.social_emb(batch["nbrs"])
        cnt = mask.sum(1, keepdim=True)
        if self.model_cfg.aggregator == "mean":
            w = mask / cnt.clamp(min=1.0)
        elif self.model_cfg.aggregator == "gcn":
            # the user-side half of GCN's symmetric norm: the neighbour's degree is another user's record
            w = mask / cnt.clamp(min=1.0).sqrt()
        else:
            assert self.att is not None
            q = torch.zeros_like(s) if bag_query is None else bag_query[:, None, :].expand_as(s)
            logits = self.att(torch.cat([q, s], dim=-1)).squeeze(-1).masked_fill(mask == 0, -1e9)
            w = torch.softmax(logits, dim=1) * mask
        return (w[..., None] * s).sum(1)

    def _fuse(self, parts: list[torch.Tensor], extra: torch.Tensor | None) -> torch.Tensor:
        """h = sum(parts) (+ local p_u) + MLP(concat(parts)); parts share their leading shape."""
        h = torch.stack(parts, 0).sum(0)
        if self.mlp is not None:
            h = h + self.mlp(torch.cat(parts, dim=-1))
        return h if extra is None else h + extra

    def _local_user(self, users: torch.Tensor) -> torch.Tensor | None:
        return self.local_user[users] if self.local_user.shape[0] else None

    def target_user_vectors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h [B, H, d] per target with the target left out of the bag, item vectors [B, H+M, d], biases).

        Without the local p_u (the caller adds it): used by the loss and the local refit.
        """
        tg, neg, users = batch["targets"], batch["negatives"], batch["users"]
        B, H = tg.shape
        item_idx = torch.cat([tg, neg], dim=1)
        qv = self.item_emb(item_idx)
        cb = self.item_bias(item_idx).squeeze(-1)
        parts: list[torch.Tensor] = []
        bag_full = None
        if self.hist_emb is not None:
            bag, bmask, tin = batch["bag"], batch["bag_mask"], batch["target_in_bag"]
            y = self.hist_emb(torch.cat([bag, tg], dim=1))
            y_bag, y_t = y[:, : bag.shape[1]], y[:, bag.shape[1]:]
            total = (y_bag * bmask[..., None]).sum(1)
            n = bmask.sum(1)
            bag_full = total / n.clamp(min=1.0).sqrt()[:, None]
            loo = total[:, None, :] - y_t * tin[..., None]  # leave the target out of its own bag
            parts.append(loo / (n[:, None] - tin).clamp(min=1.0).sqrt()[..., None])
        r = self._social(batch, bag_full)
        if r is not None:
            parts.append(r[:, None, :].expand(B, H, -1))
        if self.user_emb is not None:
            parts.append(self.user_emb(users)[:, None, :].expand(B, H, -1))
        if not parts:
            parts.append(torch.zeros(B, H, self.model_cfg.dim, device=qv.device))
        return self._fuse(parts, None), qv, cb

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """h_u [B, d] for evaluation: the whole bag, all out-neighbours, p_u (trained or local)."""
        users = batch["users"]
        parts: list[torch.Tensor] = []
        bag_full = None
        if self.hist_emb is not None:
            bmask = batch["bag_mask"]
            total = (self.hist_emb(batch["bag"]) * bmask[..., None]).sum(1)
            bag_full = total / bmask.sum(1).clamp(min=1.0).sqrt()[:, None]
            parts.append(bag_full)
        r = self._social(batch, bag_full)
        if r is not None:
            parts.append(r)
        if self.user_emb is not None:
            parts.append(self.user_emb(users))
        if not parts:
            parts.append(torch.zeros(users.shape[0], self.model_cfg.dim, device=users.device))
        return self._fuse(parts, self._local_user(users))

    # --- contract ----------------------------------------------------------------------------
    def score_targets(self, h: torch.Tensor, qv: torch.Tensor, cb: torch.Tensor, H: int) -> tuple[
            torch.Tensor, torch.Tensor]:
        """(positive scores [B, H], negative scores [B, H, M]) from per-target user vectors."""
        h, qv = self._normalise(h), self._normalise(qv)
        pos = (h * qv[:, :H]).sum(-1) + cb[:, :H]
        neg = torch.einsum("bhd,bmd->bhm", h, qv[:, H:]) + cb[:, None, H:]
        return pos, neg

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        h, qv, cb = self.target_user_vectors(batch)  # the local p_u is refitted after training, not here
        pos, neg = self.score_targets(h, qv, cb, batch["targets"].shape[1])
        per_target = compute_loss_per_target(pos, neg, batch["neg_mask"], self.model_cfg.loss)
        return compute_user_mean(per_target, batch["target_mask"])

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        # outside DP: reading the weights directly is fine here
        items = self._normalise(self.item_emb.weight)
        return self._normalise(self.user_vectors(batch)) @ items.T + self.item_bias.weight.T

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine scoring with a temperature (Wu et al. 2022, sampled softmax for recommendation) when set."""
        tau = self.model_cfg.temperature
        return x if tau <= 0 else nn.functional.normalize(x, dim=-1) / tau ** 0.5

    def refit_local_users(self, batch: Batch, steps: int, l2: float, lr: float = 0.05) -> None:
        """Fit p_u for the batch's users on their own training items, shared parameters frozen.

        Minimises the model loss + l2 * |p_u|^2 over p_u only (a convex problem per user: h_u's
        shared part is fixed), with Adam; the result goes into the ``local_user`` buffer. Uses only
        each user's own record, so the user's own recommendations may use it (billboard model).
        """
        if not self.local_user.shape[0] or steps == 0:
            return
        users, H = batch["users"], batch["targets"].shape[1]
        with torch.no_grad():
            h0, qv, cb = self.target_user_vectors(batch)
        p = torch.zeros(users.shape[0], h0.shape[-1], device=h0.device, requires_grad=True)
        opt = torch.optim.Adam([p], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            pos, neg = self.score_targets(h0 + p[:, None, :], qv, cb, H)
            per_target = compute_loss_per_target(pos, neg, batch["neg_mask"], self.model_cfg.loss)
            loss = compute_user_mean(per_target, batch["target_mask"]) + l2 * (p * p).sum(1)
            loss.sum().backward()
            opt.step()
        with torch.no_grad():
            self.local_user[users] = p.detach()
