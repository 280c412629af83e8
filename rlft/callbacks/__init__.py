"""Lightning callbacks for rlft runs (evaluation during training)."""

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
]
