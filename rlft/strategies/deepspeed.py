"""DeepSpeed ZeRO through Lightning, on GPUs and — for tests, CI and laptops — on CPU processes over gloo.

Lightning's ``DeepSpeedStrategy`` refuses every accelerator but CUDA in ``setup_environment``, although DeepSpeed
itself ships a CPU accelerator (picked automatically when no GPU is visible; ``DS_ACCELERATOR=cpu`` forces it)
that trains ZeRO-2 and ZeRO-3 over gloo. This subclass lifts only that check; everything else — the engine, the
ZeRO config, the sharded checkpoints — is Lightning's and DeepSpeed's own code, so a run proven on CPU processes
takes the same path on GPUs.

Two things Lightning leaves to the user are filled in here:

- **Gradient clipping for manual optimisation.** DeepSpeed clips inside ``engine.step()`` from its config, so the
  ``max_grad_norm`` of PPO/GRPO (which step the optimiser themselves) is written into the config, as the
  trainer's ``gradient_clip_val`` is for the other methods.
- **Loading under ZeRO-3.** rlft methods build their network in ``configure_model``; there, transformers' own
  ZeRO-3 loading is switched on (``HfDeepSpeedConfig``), so each rank allocates only its partition of the base
  and fills it from the checkpoint — no rank holds the whole model first. Lightning's ``deepspeed.zero.Init``
  around the whole hook is not used: it would also partition the LoRA layers the moment PEFT creates them, and
  PEFT's initialisation (``lora_B = 0``) would then write into empty partitions. The small modules built after
  the base (LoRA, reward and value heads) are partitioned by ``deepspeed.initialize``.
- **The precision a CPU can run.** fp16 needs loss scaling and fp16 kernels that DeepSpeed's CPU accelerator does
  not have; it is refused up front with the fix, instead of failing deep inside the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

from rlft.models.memory import return_freed_memory

if not torch.cuda.is_available():
    # what DeepSpeed would pick anyway; said up front, it does not print its "no GPU detected" warning on stdout
    # (which would end up in `rlft fit --print_config`)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy that also runs on CPU processes (gloo).

    Takes every argument of :class:`lightning.pytorch.strategies.DeepSpeedStrategy` (``stage``,
    ``offload_optimizer``, ``offload_parameters``, ``config`` ...).
    """

    strategy_name = "rlft_deepspeed"

    def __init__(self, *args, param_persistence_threshold: int | None = None, **kwargs) -> None:
        """``param_persistence_threshold``: ZeRO-3 keeps parameters with fewer elements than this whole on every
        rank (DeepSpeed's default 1e5); 0 shards every parameter."""
        super().__init__(*args, **kwargs)
        self.param_persistence_threshold = param_persistence_threshold

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        if not self.zero_stage_3:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        self._init_config_if_needed()
        # transformers keeps only a weak reference: the object must live until the network is built
        hf_config = HfDeepSpeedConfig(self.config)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()  # later loads (a reward model scoring rollouts) stay whole
            del hf_config
            return_freed_memory()

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            precision = str(getattr(self.precision_plugin, "precision", "32-true"))
            if precision.startswith("16"):
                raise ValueError(
                    f"precision {precision!r} with DeepSpeed on CPU cannot work (fp16 needs CUDA kernels and loss "
                    "scaling); use --trainer.precision 32-true or bf16-mixed on CPU, or run on GPUs"
                )
            # skip only Lightning's "CUDA only" check: DDPStrategy's setup is what DeepSpeed's own runs after it
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if not isinstance(self.accelerator, CPUAccelerator):
            return super().setup_distributed()
        # CPU devices have no index to check against the local rank (Lightning's GPU-only validation)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _format_batch_size_and_grad_accum_config(self) -> None:
        super()._format_batch_size_and_grad_accum_config()
        if self.param_persistence_threshold is not None and "zero_optimization" in self.config:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = self.param_persistence_threshold
        module = self.lightning_module
        clip = getattr(getattr(module, "hparams", {}), "get", lambda *_: None)("max_grad_norm")
        if module is not None and not module.automatic_optimization and clip:
            self.config["gradient_clipping"] = float(clip)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not isinstance(self.accelerator, CPUAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # Lightning passes the CUDA device index as DeepSpeed's rank; CPU devices have none, so pass the local rank
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer
