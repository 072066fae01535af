"""The ``prior`` candidate of the joint-scope DP selection (shared/privacy/selection.py): a model that ranks every
user's items by a DP popularity estimate, the user-item term dropped (a MostPop over DP releases; cf.
shared/models/mostpop.py, which counts interactions).

Where the catalogue has categories (the model's ``item_cat``, ``model.use_category``), the prior is personalised
by the user's own category shares: P(i | u) = P(i | c(i)) P(c(i) | u), with P(i | c) the prior's popularity within
the category (``exp(prior_i) / sum_{j in c} exp(prior_j)``) and P(c | u) the share of the user's own training
items in category c, smoothed towards the catalogue's share under the prior by one pseudo-interaction
(:data:`PRIOR_PSEUDOCOUNT`; a user without items ranks by the plain prior). Category-aware popularity is the
classical personalised popularity baseline; here it is post-processing of the DP release and of the user's own
record only, so in joint scope (Kearns et al. 2014, the billboard model) it keeps the guarantee, as the local p_u
refit does. Measured on Ciao (28 categories, 105k items): plain prior at the federation's DP popularity noise
0.0213 NDCG@10, with the user's category shares 0.0260 (docs/BENCHMARKS.md 10.10).
"""

from __future__ import annotations

from typing import Any

import torch

from fedsocial.shared.models import Batch, RecModel


def compute_prior_item_scores(model: RecModel) -> torch.Tensor:
    """The ``prior`` candidate's item scores [n_items]: the DP popularity release's prior where the model has one
    (``item_prior()``), else its item biases (``item_biases()``).

    The release is a direct DP estimate of popularity; the biases are trained together with the noisy user-item
    term and take up its noise (FilmTrust, epsilon 8, centralized: NDCG@10 0.5006 for the release's prior alone,
    0.4785 with the biases added, 0.1701 for the biases alone; MostPop 0.5026: docs/BENCHMARKS.md 10.5)."""
    item_prior, item_biases = getattr(model, "item_prior", None), getattr(model, "item_biases", None)
    with torch.no_grad():
        prior = item_prior() if callable(item_prior) else None
        if isinstance(prior, torch.Tensor):
            return prior.detach()
        if not callable(item_biases):
            raise ValueError(f"selection: {type(model).__name__} has neither a popularity prior nor item biases")
        biases = item_biases()
        assert isinstance(biases, torch.Tensor)
        return biases.detach()


def compute_prior_scores(item_scores: torch.Tensor, n_users: int) -> torch.Tensor:
    """The ``prior`` candidate's scores [n_users, n_items]: every user's row is ``item_scores``."""
    return item_scores.reshape(1, -1).expand(int(n_users), -1)


PRIOR_PSEUDOCOUNT = 1.0  # interactions' worth of the catalogue's category shares added to each user's own


def compute_category_log_mass(item_scores: torch.Tensor, item_cat: torch.Tensor) -> torch.Tensor:
    """log sum_{i in c} exp(s_i) per category [C] (-inf for a code no item has)."""
    top = item_scores.max()
    n_cat = int(item_cat.max()) + 1
    mass = torch.zeros(n_cat, dtype=item_scores.dtype, device=item_scores.device)
    mass.index_add_(0, item_cat, torch.exp(item_scores - top))
    return torch.log(mass) + top


def compute_user_category_counts(bag: torch.Tensor, bag_mask: torch.Tensor, item_cat: torch.Tensor,
                                 n_cat: int) -> torch.Tensor:
    """Each user's training items per category [B, C], from an evaluation batch's whole bag [B, L] and its mask."""
    counts = torch.zeros(bag.shape[0], n_cat, dtype=torch.float32, device=bag.device)
    return counts.scatter_add_(1, item_cat[bag], bag_mask.to(torch.float32))


def compute_category_affinity(counts: torch.Tensor, log_mass: torch.Tensor,
                              pseudocount: float = PRIOR_PSEUDOCOUNT) -> torch.Tensor:
    """log P(c | u) [B, C] = log((n_uc + a g_c) / (n_u + a)), g the catalogue's category shares under the prior."""
    share = torch.softmax(log_mass.to(torch.float32), 0)
    return torch.log((counts + pseudocount * share) / (counts.sum(1, keepdim=True) + pseudocount))


def compute_category_prior_scores(item_scores: torch.Tensor, item_cat: torch.Tensor, log_mass: torch.Tensor,
                                  affinity: torch.Tensor) -> torch.Tensor:
    """log P(i | c(i)) + log P(c(i) | u) [B, I]: the prior within each category, times the user's share of it."""
    return (item_scores - log_mass[item_cat])[None, :] + affinity[:, item_cat]


def category_index(model: RecModel) -> torch.Tensor | None:
    """The model's item categories [I] where it has them (``model.use_category``) and its prior is personalised by
    them (``model.prior_by_category``), else None."""
    if not model.model_cfg.prior_by_category:
        return None
    cats = getattr(model, "item_cat", None)  # a buffer of the social model; empty without model.use_category
    return cats if isinstance(cats, torch.Tensor) and cats.numel() == model.n_items > 0 else None


class PriorRanking(RecModel):
    """The ``prior`` candidate as a model: ranks by :func:`compute_prior_item_scores` of ``model``, personalised
    by each user's own category shares where the model has item categories (the module's docstring)."""

    def __init__(self, model: RecModel) -> None:
        super().__init__(model.n_users, model.n_items, model.model_cfg)
        compute_prior_item_scores(model)  # refuses a model with nothing to rank by
        self.base = model

    def item_side(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(the prior's item scores, the item categories, their log masses), once per evaluation pass."""
        scores = compute_prior_item_scores(self.base)
        cats = category_index(self.base)
        return scores, cats, (None if cats is None else compute_category_log_mass(scores, cats))

    def score_all(self, batch: Batch, item_side: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
                  ) -> torch.Tensor:
        scores, cats, log_mass = item_side
        if cats is None or log_mass is None or "bag" not in batch:
            return compute_prior_scores(scores, batch["users"].shape[0])
        counts = compute_user_category_counts(batch["bag"], batch["bag_mask"], cats, log_mass.shape[0])
        return compute_category_prior_scores(scores, cats, log_mass, compute_category_affinity(counts, log_mass))

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        return self.score_all(batch, self.item_side())


class ProductRanking(RecModel):
    """The ``product`` candidate: the DP model times the (personalised) prior, a product of two experts (Hinton
    2002): score = the model's score + :class:`PriorRanking`'s, i.e. P(i | u) proportional to P_model(i | u)
    P_prior(i | u). Where the DP model learns little per item (Ciao's 105k items, 2.7 interactions each) the
    second factor sharpens its popularity and brings in the user's category shares, which its noisy item rows
    cannot carry (two Ciao federations at joint epsilon 8, test NDCG@10: model 0.0224 / 0.0225, prior 0.0259 /
    0.0259, product 0.0265 / 0.0260; docs/BENCHMARKS.md 10.11). The same post-processing of DP parameters and
    the user's own record as its two factors."""

    def __init__(self, model: RecModel) -> None:
        super().__init__(model.n_users, model.n_items, model.model_cfg)
        self.base, self.prior = model, PriorRanking(model)

    def item_side(self) -> tuple[Any, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        return self.base.item_side(), self.prior.item_side()

    def score_all(self, batch: Batch, item_side: tuple[Any, Any]) -> torch.Tensor:
        return self.base.score_all(batch, item_side[0]) + self.prior.score_all(batch, item_side[1])

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        return self.score_all(batch, self.item_side())


def candidate_model(name: str, model: RecModel) -> RecModel:
    """The selection candidate ``name`` (shared/privacy/selection.py) of the trained ``model``."""
    if name == "model":
        return model
    if name == "prior":
        return PriorRanking(model)
    if name == "product":
        return ProductRanking(model)
    raise ValueError(f"selection: unknown candidate {name!r}")
