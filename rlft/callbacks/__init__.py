"""Lightning callbacks for rlft runs (evaluation during training, torch.compile)."""

from rlft.callbacks.compile import TorchCompile
from rlft.callbacks.evaluation import (
    EvaluationCallback,
    PassAtKCallback,
    PerplexityCallback,
    RewardAccuracyCallback,
    SampleGenerationsCallback,
)

__all__ = [
    "EvaluationCallback",
    "PassAtKCallback",
    "PerplexityCallback",
    "RewardAccuracyCallback",
    "SampleGenerationsCallback",
    "TorchCompile",
]
