"""Lightning callbacks for rlft runs (evaluation during training, torch.compile)."""

from rlft.callbacks.compile import TorchCompile
from rlft.callbacks.evaluation import (
    EvaluationCallback,
    LMEvalCallback,
    PassAtKCallback,
    PerplexityCallback,
    RewardAccuracyCallback,
    SampleGenerationsCallback,
    WinRateCallback,
)

__all__ = [
    "EvaluationCallback",
    "LMEvalCallback",
    "PassAtKCallback",
    "PerplexityCallback",
    "RewardAccuracyCallback",
    "SampleGenerationsCallback",
    "TorchCompile",
    "WinRateCallback",
]
