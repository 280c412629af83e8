"""Training methods: one ``LightningModule`` each, all on :class:`rlft.methods.base.RLFTModule`."""

from rlft.methods.base import OptimizerSettings, RLFTModule
from rlft.methods.sft import SFT

__all__ = ["SFT", "OptimizerSettings", "RLFTModule"]
