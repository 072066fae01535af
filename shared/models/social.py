"""The fedsocial model: behaviour bag + social aggregation + residual MLP (DESIGN.md, "The model").

Structure after TrustSVD (Guo, Zhang and Yorke-Smith, AAAI 2015), FISM (Kabbur, Ning and Karypis,
KDD 2013) and SVD++ (Koren, KDD 2008), with the founding article's MLP as a residual refinement:

    b_u = sum_{j in bag(u)} y_j / sqrt(|bag(u)|)          (history table y; a target leaves the bag)
    r_u = sum_{v in N_K(u)} w_uv s_v                       (social table s, mean | gcn | attention)
    h_u = b_u + r_u (+ p_u) + MLP([b_u ; r_u (; p_u)])     (MLP output layer starts at zero)
    score(u, i) = h_u . q_i + c_i,   c_i = bias_scale * b_i
    (use_category: q_i += g_cat(i) and y_j += k_cat(j), one vector per catalogue category;
     use_price: q_i += g_price(i) and y_j += k_price(j), one vector per price bin;
     use_text: q_i += W t_i, a shared projection of the item's offline text features t_i;
     use_user_features: f_u = sum_c e_{c, x_uc} / sqrt(C) joins the parts of h_u, one shared vector per
     value of each users.csv column; x_u is user u's own record and stays on u's partner)
    (learned_scale: the user-item term h_u . q_i is multiplied by exp(4 w), w one shared learnt scalar, as
     CLIP learns its logit scale (Radford et al., ICML 2021); under DP it weighs the noisy term against
     the biases and the popularity prior)

Inside a training example the user's vector is computed from the user's own record (items,
out-neighbour ids) and parameters only. The bias is parameterised as c_i = bias_scale * b_i: the
gradient of b_i is bias_scale times that of c_i, so under one flat per-user clipping norm the scale
sets how much of the norm the biases get (at init with cosine scores they get under 1% of it on Ciao)
and, with Adam, how fast they move; 1.0 is the plain parameterisation.

With ``use_category`` the item catalogue's categories (public: DESIGN.md, what is not hidden) add a
shared vector per category to the item and history vectors, as in feature-based factorisation
(Rendle, ICDM 2010). Under DP-SGD a row of a large, long-tailed item table gets noise at every step
but signal only from the few users of that item; a category row gets signal from every user of any
of its items, so it is learnt where most item rows are not (DESIGN.md: prefer parameters that many
users share). Price bins work the same way; text features are fixed inputs (the catalogue is public)
and only their projection W is trained. Each embedding table is called exactly once per forward
with concatenated indices and padding is handled by masks, as Opacus ghost clipping requires.
With ``user_embedding = "local"`` p_u is not a parameter: it is a buffer refitted per user
against the frozen shared parameters (``refit_local_users``), added only to that user's scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsocial.shared.config import ModelConfig
from fedsocial.shared.models import (
    Batch,
    ModelError,
    RecModel,
    compute_kept_negatives,
    compute_loss_per_target_premasked,
    compute_negative_addend,
    compute_user_mean,
    init_embedding_,
)
from fedsocial.shared.optim import make_adamw


@dataclass(frozen=True)
class RefitInputs:
    """The local refit's fixed terms (``SocialRec.refit_inputs``): one user batch, B users, H targets, M negatives."""

    h0: torch.Tensor  # h_u's shared part per target, the target left out of the bag [B, H, d]
    q_pos: torch.Tensor  # the targets' scored (normalised) vectors [B, H, d]
    cb_pos: torch.Tensor  # the targets' biases [B, H]
    q_neg_t: torch.Tensor  # the negatives' scored vectors, transposed [B, d, M]
    neg_add: torch.Tensor  # the negatives' biases, MASKED where removed [B, 1, M]
    n_valid: torch.Tensor  # kept negatives per user, >= 1 [B, 1]
    target_mask: torch.Tensor  # [B, H]
    scale: torch.Tensor | None  # learned_scale per user [B, 1], or None


SCALE_RATE = 4.0  # learned_scale: d log(scale) / dw; Adam moves w about lr a step, so log(scale) moves 4 lr
SCALE_LIMIT = 6.0  # |log(scale)| <= 6: the scale stays in [0.0025, 403] whatever the noise does to w


def compute_category_index(item_category: np.ndarray | None, n_items: int, key: str = "model.use_category",
                           what: str = "item categories") -> torch.Tensor:
    """The catalogue's category (or price bin) of every item as a long tensor [n_items] (codes 0..C-1)."""
    if item_category is None:
        raise ModelError(f"{key}: the data set has no {what}")
    cats = np.asarray(item_category)
    if cats.shape != (n_items,) or (cats < 0).any():
        raise ModelError(f"{key}: expected {n_items} non-negative codes, got shape {cats.shape}")
    return torch.as_tensor(cats, dtype=torch.long)


def compute_user_feature_index(user_features: np.ndarray | None, sizes: tuple[int, ...], n_users: int) -> torch.Tensor:
    """Each user's feature codes as rows of one table: column c's codes shifted by the sizes before it."""
    if user_features is None or not sizes:
        raise ModelError("model.use_user_features: the data set has no user features (users.csv)")
    codes = np.asarray(user_features, dtype=np.int64)
    if codes.shape != (n_users, len(sizes)) or (codes < 0).any() or (codes >= np.asarray(sizes)).any():
        raise ModelError(f"model.use_user_features: expected codes [{n_users}, {len(sizes)}] below {sizes}, "
                         f"got shape {codes.shape}")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return torch.as_tensor(codes + offsets[None, :], dtype=torch.long)


def compute_text_matrix(item_text: np.ndarray | None, n_items: int) -> torch.Tensor:
    """The items' offline text features as a float tensor [n_items, t] (shared/features.py)."""
    if item_text is None:
        raise ModelError("model.use_text: the data set has no item texts (items.csv title or text)")
    feats = np.asarray(item_text, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != n_items or not np.isfinite(feats).all():
        raise ModelError(f"model.use_text: expected finite features [{n_items}, t], got shape {feats.shape}")
    return torch.as_tensor(feats)


class SocialRec(RecModel):
    shared_prefixes = ("item_emb.", "item_bias.", "hist_emb.", "mlp.", "att.", "cat_emb.", "hist_cat_emb.",
                       "price_emb.", "hist_price_emb.", "text_proj.", "user_feat_emb.", "item_pop", "scale_emb.")
    # learned_scale compensates DP noise; without DP the training loss only sharpens it (the scale grew to 2-3
    # and a partner's non-private model lost a quarter of its NDCG@10 on LastFM: BENCHMARKS.md 10.2)
    dp_only_prefixes = ("scale_emb.",)
    local_user: torch.Tensor
    item_cat: torch.Tensor
    item_price: torch.Tensor
    item_text: torch.Tensor
    user_feat: torch.Tensor

    def __init__(self, n_users: int, n_items: int, model_cfg: ModelConfig,
                 item_category: np.ndarray | None = None, item_price_bin: np.ndarray | None = None,
                 item_text: np.ndarray | None = None, user_features: np.ndarray | None = None,
                 user_feature_sizes: tuple[int, ...] = (), popularity_prior: bool = False, **_: object) -> None:
        super().__init__(n_users, n_items, model_cfg)
        d, c = model_cfg.dim, model_cfg
        self.item_emb = nn.Embedding(n_items, d)
        self.cat_emb = self.hist_cat_emb = None
        self.register_buffer("item_cat", torch.zeros(0, dtype=torch.long))
        if c.use_category:
            self.item_cat = compute_category_index(item_category, n_items)
            n_cat = int(self.item_cat.max()) + 1
            self.cat_emb = nn.Embedding(n_cat, d)
            self.hist_cat_emb = nn.Embedding(n_cat, d) if c.use_history else None
            for emb in (self.cat_emb, self.hist_cat_emb):
                if emb is not None:
                    init_embedding_(emb, c.init_std)
        self.price_emb = self.hist_price_emb = None
        self.register_buffer("item_price", torch.zeros(0, dtype=torch.long))
        if c.use_price:
            self.item_price = compute_category_index(item_price_bin, n_items, "model.use_price",
                                                     "item prices (items.csv price)")
            n_bins = int(self.item_price.max()) + 1
            self.price_emb = nn.Embedding(n_bins, d)
            self.hist_price_emb = nn.Embedding(n_bins, d) if c.use_history else None
            for emb in (self.price_emb, self.hist_price_emb):
                if emb is not None:
                    init_embedding_(emb, c.init_std)
        self.text_proj = None
        self.register_buffer("item_text", torch.zeros(0, 0))
        if c.use_text:
            self.item_text = compute_text_matrix(item_text, n_items)
            self.text_proj = nn.Linear(self.item_text.shape[1], d, bias=False)
            nn.init.normal_(self.text_proj.weight, std=c.init_std)
        self.user_feat_emb = None
        self.register_buffer("user_feat", torch.zeros(0, 0, dtype=torch.long))  # local: the users' own records
        if c.use_user_features:
            self.user_feat = compute_user_feature_index(user_features, tuple(user_feature_sizes), n_users)
            self.user_feat_emb = nn.Embedding(int(sum(user_feature_sizes)), d)
            init_embedding_(self.user_feat_emb, c.init_std)
        self.item_bias = nn.Embedding(n_items, 1)
        # the DP popularity release (shared/privacy/popularity.py): shared, never trained (no DP-SGD noise)
        self.item_pop = nn.Parameter(torch.zeros(n_items), requires_grad=False) if popularity_prior else None
        self._prior_cache: tuple[int, torch.Tensor] | None = None
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
        # learned_scale: w, one shared scalar; the user-item term is multiplied by exp(SCALE_RATE * w) (w = 0:
        # the plain model). An embedding of one row looked up once per example, so that DP clipping sees a
        # per-example gradient (one-pass and Opacus ghost clipping support only Embedding and Linear)
        self.scale_emb = nn.Embedding(1, 1) if c.learned_scale else None
        if self.scale_emb is not None:
            nn.init.zeros_(self.scale_emb.weight)
        n_parts = (int(c.use_history) + int(c.use_social) + int(c.user_embedding == "trained")
                   + int(c.use_user_features))
        self.mlp = None
        if c.use_mlp and n_parts > 0:
            out = nn.Linear(c.mlp_hidden, d)
            nn.init.zeros_(out.weight)  # residual: start as the dot-product model
            nn.init.zeros_(out.bias)
            self.mlp = nn.Sequential(nn.Linear(n_parts * d, c.mlp_hidden), nn.ReLU(), out)

    # --- item side ----------------------------------------------------------------------------
    def _item_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """q_i (+ g_cat(i)) (+ g_price(i)) (+ W t_i); each table is looked up once, as ghost clipping requires."""
        q = self.item_emb(idx)
        if self.cat_emb is not None:
            q = q + self.cat_emb(self.item_cat[idx])
        if self.price_emb is not None:
            q = q + self.price_emb(self.item_price[idx])
        if self.text_proj is not None:
            q = q + self.text_proj(self.item_text[idx])
        return q

    def _history_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """y_j (+ k_cat(j)) for the behaviour bag."""
        assert self.hist_emb is not None
        y = self.hist_emb(idx)
        if self.hist_cat_emb is not None:
            y = y + self.hist_cat_emb(self.item_cat[idx])
        if self.hist_price_emb is not None:
            y = y + self.hist_price_emb(self.item_price[idx])
        return y

    def item_prior(self) -> torch.Tensor | None:
        """The fixed item prior from the released popularity (None without a release), cached per value."""
        if self.item_pop is None:
            return None
        version = self.item_pop._version
        if self._prior_cache is None or self._prior_cache[0] != version:
            from fedsocial.shared.privacy.popularity import compute_popularity_prior

            prior = compute_popularity_prior(self.item_pop.detach().cpu().numpy())
            self._prior_cache = (version, torch.as_tensor(prior, dtype=torch.float32, device=self.item_pop.device))
        return self._prior_cache[1]

    def item_biases(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """b_i * bias_scale (+ the popularity prior) of the items ``idx`` (all items when None)."""
        b = self.item_bias.weight[:, 0] if idx is None else self.item_bias(idx).squeeze(-1)
        b = b * self.model_cfg.bias_scale
        prior = self.item_prior()
        if prior is None:
            return b
        return b + (prior if idx is None else prior[idx])

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

    def _user_features(self, users: torch.Tensor) -> torch.Tensor | None:
        """f_u [B, d] from the user's own categorical features (one table lookup, as ghost clipping requires)."""
        if self.user_feat_emb is None:
            return None
        return self.user_feat_emb(self.user_feat[users]).sum(1) / self.user_feat.shape[1] ** 0.5

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
        qv = self._item_vectors(item_idx)
        cb = self.item_biases(item_idx)
        parts: list[torch.Tensor] = []
        bag_full = None
        if self.hist_emb is not None:
            bag, bmask, tin = batch["bag"], batch["bag_mask"], batch["target_in_bag"]
            y = self._history_vectors(torch.cat([bag, tg], dim=1))
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
        f = self._user_features(users)
        if f is not None:
            parts.append(f[:, None, :].expand(B, H, -1))
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
            total = (self._history_vectors(batch["bag"]) * bmask[..., None]).sum(1)
            bag_full = total / bmask.sum(1).clamp(min=1.0).sqrt()[:, None]
            parts.append(bag_full)
        r = self._social(batch, bag_full)
        if r is not None:
            parts.append(r)
        if self.user_emb is not None:
            parts.append(self.user_emb(users))
        f = self._user_features(users)
        if f is not None:
            parts.append(f)
        if not parts:
            parts.append(torch.zeros(users.shape[0], self.model_cfg.dim, device=users.device))
        return self._fuse(parts, self._local_user(users))

    # --- contract ----------------------------------------------------------------------------
    def user_scale(self, users: torch.Tensor | None = None) -> torch.Tensor | None:
        """exp(SCALE_RATE * w) of ``learned_scale`` (None without it): [B, 1] looked up per example for the
        users of a training batch, the scalar itself (shape [1]) for scoring."""
        if self.scale_emb is None:
            return None
        w = self.scale_emb.weight[0] if users is None else self.scale_emb(torch.zeros_like(users))
        return (SCALE_RATE * w).clamp(-SCALE_LIMIT, SCALE_LIMIT).exp()

    def scored_user_vectors(self, batch: Batch) -> torch.Tensor:
        """The user side of a score, h_u normalised (cosine) and scaled (learned_scale): [B, d]."""
        h = self._normalise(self.user_vectors(batch))
        scale = self.user_scale()
        return h if scale is None else h * scale

    def score_targets(self, h: torch.Tensor, qv: torch.Tensor, cb: torch.Tensor, H: int,
                      scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive scores [B, H], negative scores [B, H, M]) from per-target user vectors; ``scale`` [B, 1]
        multiplies the user-item term (``user_scale``)."""
        h, qv = self._normalise(h), self._normalise(qv)
        if scale is not None:
            h = h * scale[:, :, None]
        pos = (h * qv[:, :H]).sum(-1) + cb[:, :H]
        neg = torch.einsum("bhd,bmd->bhm", h, qv[:, H:]) + cb[:, None, H:]
        return pos, neg

    def fused_scores(self, h: torch.Tensor, q_pos: torch.Tensor, cb_pos: torch.Tensor, q_neg_t: torch.Tensor,
                     neg_add: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``score_targets`` from scored item vectors, the negatives' transposed [B, d, M] and their biases with
        the mask as one addend [B, 1, M] (``compute_negative_addend``): negatives MASKED where removed."""
        h = self._normalise(h)
        if scale is not None:
            h = h * scale[:, :, None]
        return (h * q_pos).sum(-1) + cb_pos, torch.baddbmm(neg_add, h, q_neg_t)  # scores, biases, mask: one kernel

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        h, qv, cb = self.target_user_vectors(batch)  # the local p_u is refitted after training, not here
        H, keep = batch["targets"].shape[1], batch["neg_mask"]
        q = self._normalise(qv)
        pos, neg = self.fused_scores(h, q[:, :H], cb[:, :H], q[:, H:].transpose(1, 2),
                                     compute_negative_addend(cb[:, H:], keep), self.user_scale(batch["users"]))
        per_target = compute_loss_per_target_premasked(pos, neg, compute_kept_negatives(keep), self.model_cfg.loss)
        return compute_user_mean(per_target, batch["target_mask"])

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        return self.score_all(batch, self.item_side())

    def item_side(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scored item vectors [I, d], biases [I]), computed once per evaluation pass."""
        # outside DP: reading the weights directly is fine here
        items = self.item_emb.weight
        if self.cat_emb is not None:
            items = items + self.cat_emb(self.item_cat)
        if self.price_emb is not None:
            items = items + self.price_emb(self.item_price)
        if self.text_proj is not None:
            items = items + self.text_proj(self.item_text)
        return self._normalise(items), self.item_biases()

    def score_all(self, batch: Batch, item_side: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        items, bias = item_side
        return torch.addmm(bias, self.scored_user_vectors(batch), items.T)  # bias + h q^T in one pass

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine scoring with a temperature (Wu et al. 2022, sampled softmax for recommendation) when set."""
        tau = self.model_cfg.temperature
        return x if tau <= 0 else nn.functional.normalize(x, dim=-1) / tau ** 0.5

    def refit_inputs(self, batch: Batch) -> RefitInputs:
        """What the local refit's objective holds fixed, computed once, without gradient."""
        H = batch["targets"].shape[1]
        with torch.no_grad():
            h0, qv, cb = self.target_user_vectors(batch)
            q = self._normalise(qv)
            keep = batch["neg_mask"]
            return RefitInputs(h0=h0, q_pos=q[:, :H], cb_pos=cb[:, :H], q_neg_t=q[:, H:].transpose(1, 2).contiguous(),
                               neg_add=compute_negative_addend(cb[:, H:], keep), n_valid=compute_kept_negatives(keep),
                               target_mask=batch["target_mask"], scale=self.user_scale(batch["users"]))

    def refit_objective(self, p: torch.Tensor, inputs: RefitInputs, l2: float) -> torch.Tensor:
        """Per-user refit objective [B]: ``calculate_loss``'s value with p_u added to h_u, + l2 * |p_u|^2."""
        pos, neg = self.fused_scores(inputs.h0 + p[:, None, :], inputs.q_pos, inputs.cb_pos, inputs.q_neg_t,
                                     inputs.neg_add, inputs.scale)
        per_target = compute_loss_per_target_premasked(pos, neg, inputs.n_valid, self.model_cfg.loss)
        return compute_user_mean(per_target, inputs.target_mask) + l2 * (p * p).sum(1)

    def refit_local_users(self, batch: Batch, steps: int, l2: float, lr: float = 0.05) -> None:
        """Fit p_u for the batch's users on their own training items, shared parameters frozen.

        Minimises the model loss + l2 * |p_u|^2 over p_u only (a convex problem per user: h_u's
        shared part is fixed), with Adam; the result goes into the ``local_user`` buffer. Uses only
        each user's own record, so the user's own recommendations may use it (billboard model).
        """
        if not self.local_user.shape[0] or steps == 0:
            return
        users = batch["users"]
        inputs = self.refit_inputs(batch)  # everything but p is fixed: the item side is prepared once
        p = torch.zeros(users.shape[0], inputs.h0.shape[-1], device=inputs.h0.device, requires_grad=True)
        opt = make_adamw([p], lr, weight_decay=0.0)  # Adam: AdamW without decay, without torch's compiler import
        for _ in range(steps):
            opt.zero_grad()
            self.refit_objective(p, inputs, l2).sum().backward()
            opt.step()
        with torch.no_grad():
            self.local_user[users] = p.detach()
