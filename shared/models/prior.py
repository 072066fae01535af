"""The ``prior`` candidate of the joint-scope DP selection (shared/privacy/selection.py): a model that ranks every
user's items by a DP popularity estimate alone, the user-item term dropped (a MostPop over DP releases; cf.
shared/models/mostpop.py, which counts interactions)."""

from __future__ import annotations

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


class PriorRanking(RecModel):
    """The ``prior`` candidate as a model: ranks by :func:`compute_prior_item_scores` of ``model``."""

    def __init__(self, model: RecModel) -> None:
        super().__init__(model.n_users, model.n_items, model.model_cfg)
        compute_prior_item_scores(model)  # refuses a model with nothing to rank by
        self.base = model

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        return compute_prior_scores(compute_prior_item_scores(self.base), batch["users"].shape[0])
