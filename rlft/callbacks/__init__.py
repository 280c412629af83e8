"""Lightning callbacks for rlft runs (evaluation during training, torch.compile, non-finite guard)."""

from rlft.callbacks.compile import TorchCompile
from rlft.callbacks.evaluation import (
    EvaluationCallback,
    PassAtKCallback,
    PerplexityCallback,
    RewardAccuracyCallback,
    SampleGenerationsCallback,
)
from rlft.callbacks.guard import NonFiniteError, NonFiniteGuard
from rlft.callbacks.resume import ResumeLogContinuity

__all__ = [
    "EvaluationCallback",
    "NonFiniteError",
    "NonFiniteGuard",
    "PassAtKCallback",
    "PerplexityCallback",
    "ResumeLogContinuity",
    "RewardAccuracyCallback",
    "SampleGenerationsCallback",
    "TorchCompile",
]
