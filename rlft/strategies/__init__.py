"""Scale-out strategies that run the same code on GPUs and on CPU processes (gloo): DeepSpeed ZeRO-2/3 and FSDP2.

Use them from YAML (``configs/trainer/deepspeed_zero2.yaml``, ``deepspeed_zero3.yaml``, ``fsdp.yaml``) or in code::

    Trainer(strategy=rlft.strategies.DeepSpeedStrategy(stage=3), accelerator="cpu", devices=2)
"""

from rlft.strategies.deepspeed import DeepSpeedStrategy
from rlft.strategies.fsdp import FSDP2Strategy
from rlft.strategies.gather import full_state_dict, full_weights, is_sharded

__all__ = ["DeepSpeedStrategy", "FSDP2Strategy", "full_state_dict", "full_weights", "is_sharded"]
