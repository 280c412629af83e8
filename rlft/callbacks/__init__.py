"""Lightning callbacks for rlft runs (evaluation during training, torch.compile, per-rank memory)."""

from rlft.callbacks.compile import TorchCompile
from rlft.callbacks.evaluation import (
    EvaluationCallback,
    PassAtKCallback,
    PerplexityCallback,
    RewardAccuracyCallback,
    SampleGenerationsCallback,
)
from rlft.callbacks.memory import MemoryReport

__all__ = [
    "EvaluationCallback",
    "MemoryReport",
    "PassAtKCallback",
    "PerplexityCallback",
    "RewardAccuracyCallback",
    "SampleGenerationsCallback",
    "TorchCompile",
]
