"""Lightning callbacks for rlft runs (evaluation during training, torch.compile, per-rank memory, non-finite guard,
online-RL run monitors, a progress line) and a crash-safe CSV logger."""

from rlft.callbacks.compile import TorchCompile
from rlft.callbacks.evaluation import (
    EvaluationCallback,
    LMEvalCallback,
    PassAtKCallback,
    PerplexityCallback,
    RewardAccuracyCallback,
    RougeCallback,
    SampleGenerationsCallback,
)
from rlft.callbacks.guard import NonFiniteError, NonFiniteGuard, UniformLossError
from rlft.callbacks.logger import CSVLogger
from rlft.callbacks.memory import MemoryReport
from rlft.callbacks.monitors import RunMonitor
from rlft.callbacks.progress import ProgressLine
from rlft.callbacks.resume import ResumeLogContinuity
from rlft.callbacks.shutdown import GracefulShutdown
from rlft.callbacks.win_rate import WinRateCallback

__all__ = [
    "CSVLogger",
    "EvaluationCallback",
    "GracefulShutdown",
    "LMEvalCallback",
    "MemoryReport",
    "NonFiniteError",
    "UniformLossError",
    "NonFiniteGuard",
    "PassAtKCallback",
    "PerplexityCallback",
    "ProgressLine",
    "ResumeLogContinuity",
    "RewardAccuracyCallback",
    "RougeCallback",
    "RunMonitor",
    "SampleGenerationsCallback",
    "TorchCompile",
    "WinRateCallback",
]
