"""``RLFTModule``: what every rlft method shares — model loading, LoRA, optimiser/schedule, checkpoints, export.

Subclasses set ``data_kind`` (what the data module must serve) and ``uses_fields`` (the per-row fields they read), and
implement ``compute_loss(batch)``, which training and validation both run. Everything a researcher typically changes
is a method of its own so a subclass overrides one thing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from typing import ClassVar, Literal

import lightning as L
import torch
import transformers
from lightning.pytorch.cli import OptimizerCallable

from rlft.data.batches import Batch
from rlft.data.collate import count_tokens
from rlft.methods.exporting import HFExport
from rlft.methods.fields import check_fields, weighted_mean
from rlft.methods.optim import OptimizerSettings, optimizer_factory, resolve_optimizer
from rlft.models import LoraSettings, load_model, load_tokenizer, supports_packing
from rlft.models.attention import segmented_attention
from rlft.models.lowp import restore_linears, store_linears
from rlft.models.modes import disable_dropout
from rlft.models.recompute import CheckpointMode
from rlft.strategies import full_weights

log = logging.getLogger(__name__)


DtypeName = Literal["float32", "bfloat16", "float16", "auto"]


def _plain(value):
    """Dataclass settings as dicts (recursively), so checkpoints load with torch's ``weights_only=True``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _mean(value: torch.Tensor) -> torch.Tensor:
    """A metric as logged: a per-example ``[B]`` tensor as its mean, a scalar as it is."""
    value = torch.as_tensor(value).detach()
    return value.float().mean() if value.dim() else value


class _RestoreWeightsOnCrash(L.Callback):
    """A fit that raises never reaches ``on_fit_end``: give the weights stored in bf16 back here, so the module a
    notebook keeps after a crash computes as loaded (outside autocast, a stored layer would multiply in bf16)."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        restore_linears(pl_module)


class RLFTModule(HFExport, L.LightningModule):
    """Base of every rlft method.

    A method declares its own arguments and passes the rest on with ``**kwargs`` (the CLI lists these for every
    method); per-method defaults are class attributes (``default_lr``).

    Args:
        model: Model string: hub id, local folder, adapter folder (e.g. an SFT output), ``.gguf`` file or an alias
            such as ``smollm2-135m-instruct`` (pulled on first use).
        lora: LoRA settings; ``null`` trains all weights.
        dtype: Weight dtype.
        quantization: ``4bit`` or ``8bit`` loads the base through bitsandbytes (QLoRA; needs a CUDA GPU).
        gradient_checkpointing: Recompute activations in backward to save memory (works with LoRA): ``true``
            recomputes whole layers; ``selective`` keeps the matmul and attention outputs and recomputes only the
            cheap elementwise ops (most of the memory saving for a few per cent of step time).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2`` or a hub kernel; default lets transformers
            choose.
        optim: Learning-rate schedule, and the settings of the default optimiser (AdamW).
        output_dir: Where the final Hugging Face folder goes; default ``<trainer.default_root_dir>/hf_model``, so
            ``--trainer.default_root_dir`` moves the whole run.
        merge_on_save: Also save LoRA merged into the base weights (``<output_dir>/merged``).
        optimizer: Another optimiser, e.g. ``{class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}``;
            it takes its own lr and weight decay (``optim`` then sets the schedule only). Default: AdamW.
        frozen_weights_bf16: Under ``precision: bf16-mixed`` (one process or DDP), store each frozen linear weight
            that bf16 represents exactly (a checkpoint published in bf16) in bf16 while fitting: autocast would cast
            it to bf16 at every call, so no computed number changes, and the per-call casts and half the frozen
            base's memory go (:mod:`rlft.models.lowp`). Restored before the export.
    """

    data_kind: ClassVar[str] = "sft"
    # per-row numeric fields of the data this method reads (e.g. a pair's `weight`); any other draws a warning at fit
    uses_fields: ClassVar[frozenset[str]] = frozenset()
    supports_packed_batches: ClassVar[bool] = True  # False where the loss needs padded rows
    default_lr: ClassVar[float] = 2e-4

    def __init__(
        self,
        model: str,
        lora: LoraSettings | None = LoraSettings(),
        dtype: DtypeName = "float32",
        quantization: Literal["4bit", "8bit"] | None = None,
        gradient_checkpointing: CheckpointMode = False,
        attn_implementation: str | None = None,
        optim: OptimizerSettings = OptimizerSettings(),
        output_dir: str | None = None,
        merge_on_save: bool = False,
        optimizer: OptimizerCallable | None = None,
        frozen_weights_bf16: bool = True,
    ) -> None:
        super().__init__()
        self.lora_settings = LoraSettings(**lora) if isinstance(lora, dict) else lora
        optim, spec = resolve_optimizer(optim, optimizer, self.default_lr)
        self.optim_settings = optim
        self.optimizer_factory = optimizer_factory(spec) if spec is not None else None
        self.save_hyperparameters(ignore=["optimizer"])
        # plain data in hparams (and the resolved lr, so a checkpoint says what ran)
        self.hparams.update({k: _plain(v) for k, v in self.hparams.items()})
        self.hparams.update(optim=dataclasses.asdict(optim), optimizer=spec)
        self._hparams_initial = copy.deepcopy(self.hparams)
        self.tokenizer = load_tokenizer(model)
        # the network is built by configure_model, inside the strategy's init context (ZeRO-3 loads each rank's
        # partition only), or — used without a Trainer — on first access of `self.model`
        self._network_built = False
        # checkpoints hold trainable weights only; the frozen base is reloaded from `model` on resume
        self.strict_loading = False
        self._step_started = 0.0

    # ---------------------------------------------------------------- the network
    def __getattr__(self, name: str):
        if name == "model" and not self.__dict__.get("_network_built", True):
            self.build_network()
            return self._modules["model"]
        return super().__getattr__(name)

    def build_network(self) -> None:
        """Build ``self.model`` (:meth:`build_model`), then what rests on it (:meth:`on_model_built`); runs once."""
        self._network_built = True
        self.model = self.build_model()
        # from_pretrained returns eval mode and Lightning keeps submodule modes: without this, dropout and gradient
        # checkpointing would silently stay off during training (and a module put in eval() before the network
        # existed stays in eval)
        self.model.train(self.training)
        self.on_model_built()

    def on_model_built(self) -> None:
        """Set up what needs the network (references, dropout, extra heads); override and call ``super()``."""
        if self.hparams.get("disable_dropout", False):  # methods whose log-prob ratios dropout would make noisy
            disable_dropout(self.model)

    def build_model(self) -> torch.nn.Module:
        """Load the network; override for extra heads (see ``RewardModel``)."""
        hp = self.hparams
        return load_model(
            hp.model,
            dtype=hp.dtype,
            lora=self.lora_settings,
            quantization=hp.quantization,
            gradient_checkpointing=hp.gradient_checkpointing,
            attn_implementation=hp.attn_implementation,
        )

    def _packing(self) -> bool:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return datamodule is not None and getattr(datamodule.hparams, "packing", False)

    def setup(self, stage: str) -> None:
        if self._packing() and not self.supports_packed_batches:
            raise ValueError(f"{type(self).__name__} does not take packed batches; set data.packing: false")
        if stage == "fit":
            check_fields(self)  # before any step: a field it ignores is said once, up front

    def _check_packing(self) -> None:
        lm = getattr(self.model, "backbone", self.model)  # a reward model's network wraps its causal LM
        with full_weights(self):  # both probes run forwards: under ZeRO-3 the layers are partitioned already
            if segmented_attention(lm) or supports_packing(lm):
                return
        raise ValueError(
            f"{type(self.model).__name__} does not keep packed sequences apart (its positions come from the "
            "attention mask), so padding-free packing would mix examples; set data.packing: false"
        )

    # ---------------------------------------------------------------- training loop
    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss and detached metrics (names without the ``train/``/``val/`` prefix) of a batch.

        Training and validation both run it. A metric is a scalar or a per-example ``[B]`` tensor (logged as its
        mean; :meth:`validation_epoch_metrics` receives it whole).
        """
        raise NotImplementedError

    def reduce_losses(self, losses: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss to optimise from per-example ``losses``: their mean, or ``sum(w * l) / sum(w)`` when the batch has
        a per-row ``weight`` (over this process's batch)."""
        return weighted_mean(losses, batch.field("weight"))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log_dict({f"train/{k}": _mean(v) for k, v in metrics.items()})
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, metrics = self.compute_loss(batch)
        batch_size = self.batch_size_of(batch)
        if type(self).validation_epoch_metrics is not RLFTModule.validation_epoch_metrics:  # overridden: pool
            for name, value in {"loss": loss, **metrics}.items():
                self._val_pool.setdefault(name, []).append(value.detach().reshape(-1))
            self._val_batch_sizes.append(batch_size)  # a Python int: no device copy per step
            return
        self.log("val/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log_dict({f"val/{k}": _mean(v) for k, v in metrics.items()}, batch_size=batch_size, sync_dist=True)

    def validation_epoch_metrics(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics of the whole validation set from what :meth:`compute_loss` returned for each batch.

        By default validation logs each batch's loss and metrics as a mean over examples. Override this where a
        number is not such a mean (a token-weighted loss, perplexity, AUROC): validation then keeps, for every batch
        of every process, the ``loss``, the ``batch_size`` (examples) and each metric (a scalar once per batch, a
        ``[B]`` tensor whole), and passes them here as 1-D float64 tensors in order.

        Returns:
            Metric names without the ``val/`` prefix (``loss`` among them) and scalar values.
        """
        raise NotImplementedError

    def on_validation_epoch_start(self) -> None:
        self._val_pool: dict[str, list[torch.Tensor]] = {}
        self._val_batch_sizes: list[int] = []

    def on_validation_epoch_end(self) -> None:
        if not getattr(self, "_val_pool", None):
            return
        pooled = {name: torch.cat(values).double() for name, values in self._val_pool.items()}
        pooled["batch_size"] = torch.tensor(self._val_batch_sizes, dtype=torch.float64, device=self.device)
        metrics = self.validation_epoch_metrics({name: self._gather(v) for name, v in pooled.items()})
        self.log("val/loss", metrics.pop("loss").float(), prog_bar=True)
        self.log_dict({f"val/{k}": torch.as_tensor(v).float() for k, v in metrics.items()})

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every process, concatenated (processes may hold different numbers)."""
        sizes = self.all_gather(torch.tensor([len(values)], device=values.device)).reshape(-1).tolist()
        padded = values.new_zeros(max(sizes))
        padded[: len(values)] = values
        gathered = self.all_gather(padded).reshape(len(sizes), -1)
        return torch.cat([row[:n] for row, n in zip(gathered, sizes)])

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all training processes (itself in one process): for statistics and decisions
        that must cover the global batch and agree on every rank (whitening, adaptive KL, early stopping)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.detach().clone(), reduce_op="sum")

    def batch_size_of(self, batch: Batch) -> int:
        """Examples in a padded or packed batch (a pair, a ranking, a prompt counts once)."""
        return len(batch)

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: Batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_started
        tokens = count_tokens(batch)
        if elapsed > 0:
            self.log("train/tokens_per_sec", tokens / elapsed, prog_bar=True)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        settings = self.optim_settings
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        # no empty groups: ZeRO drops them from the optimizer, and a schedule built on both would then mismatch
        optimizer = self.build_optimizer([g for g in groups if g["params"]])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = settings.warmup_steps or math.ceil(settings.warmup_ratio * total)
        extra = {"min_lr_rate": settings.min_lr_ratio} if settings.scheduler == "cosine_with_min_lr" else None
        scheduler = transformers.get_scheduler(
            settings.scheduler,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total,
            scheduler_specific_kwargs=extra,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def build_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        """The optimiser over ``groups`` (decayed weights, then biases and norms with ``weight_decay: 0``): the
        injected ``optimizer``, else AdamW from ``optim``."""
        if self.optimizer_factory is not None:
            return self.optimizer_factory(groups)
        s = self.optim_settings
        return torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas), eps=s.eps, weight_decay=s.weight_decay)

    # ---------------------------------------------------------------- checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        # dropout and sampling continue from the same random stream after a resume
        checkpoint["rlft_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if rng := checkpoint.get("rlft_rng"):
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])

    def configure_model(self) -> None:
        """Build the network and let a sharding strategy (FSDP2) shard it; Lightning calls this before the optimiser
        exists, inside the strategy's init context."""
        if not self._network_built:
            self.build_network()
        shard = getattr(self.trainer.strategy, "shard_module", None) if self._trainer is not None else None
        if shard is not None:
            shard(self)
        if self._packing():  # probes run forwards: after sharding, which is when FSDP2 ranks receive weights
            self._check_packing()
        self._store_frozen_weights()

    def _store_frozen_weights(self) -> None:
        # before the strategy moves the model to its device, so the fp32 base never lands there; sharding strategies
        # (DeepSpeed, FSDP2) keep their own precision handling
        if self._trainer is None:
            return
        trainer = self.trainer
        plain = type(trainer.strategy).__name__ in ("SingleDeviceStrategy", "DDPStrategy")
        if not (self.hparams.get("frozen_weights_bf16", True) and plain and trainer.precision == "bf16-mixed"):
            return
        if trainer.state.fn != "fit":  # restored at the end of fit only
            return
        converted, skipped = store_linears(self, torch.bfloat16)
        if converted or skipped:
            log.info(
                "bf16-mixed: %d frozen linear layers stored in bf16 (their values are exact in bf16), %d kept "
                "(bf16 would round them)",
                converted,
                skipped,
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks every run of this module needs (Lightning merges them into the trainer's); call super() when
        overriding."""
        return [_RestoreWeightsOnCrash()]
