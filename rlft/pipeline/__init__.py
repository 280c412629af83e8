"""``rlft pipeline``: SFT -> reward model -> any policy method (DPO, ORPO, SimPO, GRPO, PPO, TRPO, online DPO) ->
held-out evaluation -> report, each stage an ordinary ``rlft fit`` run in its own process, resumable stage by stage,
every artefact under one run folder."""

from rlft.pipeline.config import PipelineConfig, load_pipeline
from rlft.pipeline.runner import PipelineRunner, StageFailed

__all__ = ["PipelineConfig", "PipelineRunner", "StageFailed", "load_pipeline"]
