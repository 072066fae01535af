"""MostPop: rank items by their number of training interactions (the usual non-personalised baseline)."""

from __future__ import annotations

import numpy as np
import torch

from fedsocial.shared.config import ModelConfig
from fedsocial.shared.models import Batch, RecModel


class MostPop(RecModel):
    """No parameters: ``full_sort_predict`` returns the training count of every item."""

    counts: torch.Tensor

    def __init__(self, n_users: int, n_items: int, model_cfg: ModelConfig,
                 item_counts: np.ndarray | None = None, **_: object) -> None:
        super().__init__(n_users, n_items, model_cfg)
        counts = np.zeros(n_items, dtype=np.float32) if item_counts is None else item_counts
        self.register_buffer("counts", torch.tensor(counts, dtype=torch.float32))  # a copy

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        return torch.zeros(batch["users"].shape[0], device=self.counts.device)

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        return self.counts[None, :].expand(batch["users"].shape[0], -1)
