"""Training methods: one ``LightningModule`` each, all on :class:`rlft.methods.base.RLFTModule`."""

from rlft.methods.base import OptimizerSettings, RLFTModule
from rlft.methods.dpo import DPO
from rlft.methods.grpo import GRPO
from rlft.methods.kto import KTO
from rlft.methods.online import OnlineRL
from rlft.methods.orpo import ORPO, SimPO
from rlft.methods.ppo import PPO
from rlft.methods.reinforce import ReinforcePP
from rlft.methods.reward_model import RewardModel
from rlft.methods.sft import SFT
from rlft.methods.trpo import TRPO

__all__ = [
    "SFT",
    "DPO",
    "KTO",
    "RewardModel",
    "ORPO",
    "SimPO",
    "PPO",
    "GRPO",
    "ReinforcePP",
    "TRPO",
    "OnlineRL",
    "OptimizerSettings",
    "RLFTModule",
]
