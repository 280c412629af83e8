"""``rlft serve``: an OpenAI-compatible HTTP server over rlft's batched generator (HF or vLLM backend)."""

from rlft.serve.app import create_app
from rlft.serve.engine import Choice, Completion, Engine

__all__ = ["Choice", "Completion", "Engine", "create_app"]
