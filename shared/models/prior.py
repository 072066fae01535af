"""The ``prior`` candidate of the joint-scope DP selection (shared/privacy/selection.py): a model that ranks
by another model's item biases alone (its popularity prior and biases, the user-item term dropped), as a
MostPop over DP parameters (cf. shared/models/mostpop.py, which counts interactions)."""

from __future__ import annotations

import torch

from fedsocial.shared.models import Batch, RecModel


def compute_prior_scores(item_biases: torch.Tensor, n_users: int) -> torch.Tensor:
    """The ``prior`` candidate's scores [n_users, n_items]: every user's row is the item biases."""
    return item_biases.reshape(1, -1).expand(int(n_users), -1)


class PriorRanking(RecModel):
    """The ``prior`` candidate as a model: ranks by ``model.item_biases()`` alone (no user-item term)."""

    def __init__(self, model: RecModel) -> None:
        super().__init__(model.n_users, model.n_items, model.model_cfg)
        if not hasattr(model, "item_biases"):
            raise ValueError(f"selection: {type(model).__name__} has no item biases to rank by")
        self.base = model

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            biases = self.base.item_biases()  # type: ignore[operator]  # checked in __init__
            return compute_prior_scores(biases, batch["users"].shape[0])
