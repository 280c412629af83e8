"""rlft: a PyTorch Lightning research framework for LLM post-training."""

__version__ = "0.1.0"
