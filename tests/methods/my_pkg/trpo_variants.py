"""A TRPO subclass for the DDP test: each rank writes its trainable weights at the end, so the test can check that
every rank took the same trust-region steps."""

from __future__ import annotations

import os

import torch

from rlft.methods import TRPO


class RankWeightsTRPO(TRPO):
    """TRPO that saves ``{name: tensor}`` of its trainable weights to ``$RLFT_TEST_RANK_WEIGHTS/rank{R}.pt``."""

    def on_train_end(self) -> None:
        folder = os.environ["RLFT_TEST_RANK_WEIGHTS"]
        weights = {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}
        torch.save(weights, os.path.join(folder, f"rank{self.global_rank}.pt"))
