"""``rlft serve``: an OpenAI-compatible HTTP server with continuous batching over rlft's decoder, or
windowed batches over the HF or vLLM generator."""

from rlft.serve.app import create_app
from rlft.serve.continuous import ContinuousEngine, supports_continuous
from rlft.serve.engine import Choice, Completion, Engine
from rlft.serve.limits import RequestLimits

__all__ = ["Choice", "Completion", "ContinuousEngine", "Engine", "RequestLimits", "create_app", "supports_continuous"]
