"""Stop (or skip) on a non-finite loss, gradient or weight, so a run that diverged never exports NaN or exits 0.

``rlft fit`` adds :class:`NonFiniteGuard` to every run. Its default stops at the first non-finite value with the
step, the data rows of the batch and the likely cause. ``action: skip`` (or ``RLFT_NONFINITE=skip``) instead drops
that optimiser step (gradients cleared, so AdamW leaves the weights and its moments alone), counts it
(``train/nonfinite_skips``) and stops once ``max_skips`` steps were skipped.

It also catches a run that is finite but dead: an SFT loss that sits at ``log(V)`` (``V`` the vocabulary size) is
the cross-entropy of a uniform prediction, what a huge learning rate leaves once the weights saturate. Nothing is
NaN, so without this the run would exit 0 having learned nothing. The check reads the loss the step already
computed (no extra forward), warns once with what to try and, with ``action: stop``, stops the run.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""


class UniformLossError(NonFiniteError):
    """The SFT loss stayed at ``log(V)``: the model predicts a uniform distribution and learns nothing.

    A subclass of :class:`NonFiniteError` so that every place that reports the guard's stop (the CLI's one-line
    errors) reports this one the same way.
    """


def _trainable(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _first_non_finite(named: list[tuple[str, torch.Tensor | None]]) -> str | None:
    tensors = [(n, t) for n, t in named if t is not None]
    if not tensors:
        return None
    # a DTensor (FSDP2's sharded gradients) is checked on this rank's shard; the caller agrees across ranks
    flags = torch.stack([torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for _, t in tensors])
    if bool(flags.all()):
        return None
    return tensors[int((~flags).nonzero()[0])][0]


def likely_cause(trainer: L.Trainer, module: L.LightningModule) -> str:
    """A best guess from the settings, worded as what to try."""
    hp = getattr(module, "hparams", {})
    dtype, precision = str(hp.get("dtype", "")), str(trainer.precision)
    if dtype == "float16" and precision != "16-mixed":
        return "float16 weights without loss scaling overflow; use dtype bfloat16, or float32 with precision 16-mixed"
    if precision.startswith("16"):
        return "float16 activations overflowed; try precision bf16-mixed or a lower learning rate"
    optim = hp.get("optim") or {}
    lr = optim.get("lr") if isinstance(optim, dict) else getattr(optim, "lr", None)
    if lr is not None and lr >= 1e-2:
        return f"the learning rate {lr} is high for fine-tuning; lower optim.lr"
    return "the learning rate may be too high, or the batch's rows hold degenerate data (see the rows above)"


def refuse_impossible_settings(trainer: L.Trainer, module: L.LightningModule) -> None:
    """Stop before training on combinations that cannot work (they would only produce NaN or a crash later)."""
    hp = getattr(module, "hparams", {})
    dtype, precision = str(hp.get("dtype", "")), str(trainer.precision)
    on_cpu = isinstance(trainer.accelerator, CPUAccelerator)
    if on_cpu and dtype == "float16":
        raise ValueError("model.dtype float16 on CPU: CPU kernels do not train in float16; use float32 or bfloat16")
    if on_cpu and precision.startswith("16"):
        raise ValueError(f"trainer.precision {precision} on CPU is not supported; use 32-true or bf16-mixed")
    if dtype == "float16" and hp.get("lora") is None and precision != "16-mixed":
        raise ValueError(
            "model.dtype float16 with lora: null trains float16 weights with no float32 master copy and no loss "
            "scaling (NaN within steps); use dtype bfloat16, or dtype float32 with trainer.precision 16-mixed"
        )


def _vocab_size(module: L.LightningModule) -> int | None:
    """The size of the model's output distribution, from its config (sharded weights may show a shard's shape)."""
    config = getattr(getattr(module, "model", None), "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:  # multimodal configs keep it on the text part
        size = getattr(getattr(config, "text_config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def _learning_rate(trainer: L.Trainer, module: L.LightningModule) -> float | None:
    """The configured ``optim.lr`` (what a user sets), else the optimiser's current one (the schedule's value)."""
    optim = getattr(module, "hparams", {}).get("optim") or {}
    lr = optim.get("lr") if isinstance(optim, dict) else getattr(optim, "lr", None)
    if lr is not None:
        return float(lr)
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, TypeError, ValueError):
        return None


class NonFiniteGuard(L.Callback):
    """Checks the loss before backward, gradients before each optimiser step and weights after each batch.

    Args:
        action: ``stop`` raises :class:`NonFiniteError`; ``skip`` drops the step and counts it. Default from
            ``RLFT_NONFINITE`` or ``stop``.
        max_skips: With ``skip``, stop once this many steps were skipped (a run that keeps diverging is broken).
        check_weights_every_n_steps: Weight check interval (trainable weights only; also always at the end).
        uniform_after_step: SFT only: from this optimiser step on, watch for a loss stuck at ``log(V)``. A
            randomly initialised model starts there, so early steps are not judged.
        uniform_steps: Consecutive training batches within the tolerance of ``log(V)`` that count as stuck.
        uniform_tolerance: Relative tolerance around ``log(V)``; a stuck run sits within 1e-4, a healthy one that
            merely starts near ``log(V)`` moves by more than 1e-3 from batch to batch.
    """

    def __init__(
        self,
        action: Literal["stop", "skip"] | None = None,
        max_skips: int = 100,
        check_weights_every_n_steps: int = 1,
        uniform_after_step: int = 10,
        uniform_steps: int = 10,
        uniform_tolerance: float = 1e-3,
    ) -> None:
        action = action or os.environ.get("RLFT_NONFINITE", "stop")
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard action must be 'stop' or 'skip', got {action!r}")
        if max_skips < 1 or check_weights_every_n_steps < 1:
            raise ValueError("NonFiniteGuard max_skips and check_weights_every_n_steps must be >= 1")
        self.action = action
        self.max_skips = max_skips
        self.every = check_weights_every_n_steps
        self.skips = 0
        self._batch = None
        self._bad_loss = False
        self.uniform_after_step, self.uniform_steps, self.uniform_tolerance = (
            uniform_after_step,
            uniform_steps,
            uniform_tolerance,
        )
        self._uniform_run = 0  # consecutive batches whose loss sat at log(V)
        self.uniform_warned = False

    def state_dict(self) -> dict:
        return {"skips": self.skips}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skips = state_dict.get("skips", 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch
        self._bad_loss = False

    def _rows(self, trainer) -> str:
        datamodule = getattr(trainer, "datamodule", None)
        rows = None
        if self._batch is not None and hasattr(datamodule, "rows_of"):
            rows = datamodule.rows_of(self._batch)
        if not rows:
            return "rows: unknown"
        shown = ", ".join(str(r) for r in rows[:8])
        return f"rows: {shown}" + (f" (+{len(rows) - 8} more)" if len(rows) > 8 else "")

    def _fail(self, trainer, pl_module, what: str) -> None:
        message = (
            f"non-finite {what} at step {trainer.global_step} (epoch {trainer.current_epoch}); "
            f"{self._rows(trainer)}; likely cause: {likely_cause(trainer, pl_module)}. "
            "Nothing was exported. To skip such steps instead, set RLFT_NONFINITE=skip or add "
            "rlft.callbacks.NonFiniteGuard with action: skip"
        )
        raise NonFiniteError(message)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        if self.action == "stop":
            self._fail(trainer, pl_module, f"loss ({float(loss.detach().float().mean())})")
        self._bad_loss = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = _trainable(pl_module)
        bad = _first_non_finite([(n, p.grad) for n, p in named])
        if trainer.world_size > 1 and any(hasattr(p.grad, "to_local") for _, p in named):
            # sharded gradients: a rank sees only its shard, and every rank must take the same decision (one
            # stopping or skipping alone would leave the others waiting in the next collective)
            local = bad is not None or self._bad_loss
            if trainer.strategy.reduce_boolean_decision(local, all=False) and not local:
                bad = "a gradient shard on another rank"
        if bad is None and not self._bad_loss:
            return
        if self.action == "stop":
            self._fail(trainer, pl_module, f"gradient ({bad})")
        # parameters without a gradient are left alone by torch optimisers: the step becomes a no-op
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skips += 1
        self._bad_loss = False
        log.warning(
            "non-finite %s at step %d: step skipped (%d so far)", bad or "loss", trainer.global_step, self.skips
        )
        pl_module.log("train/nonfinite_skips", float(self.skips))
        if self.skips >= self.max_skips:
            self.action = "stop"
            self._fail(trainer, pl_module, f"values in {self.skips} steps (max_skips reached)")

    def _check_weights(self, trainer, pl_module) -> None:
        bad = _first_non_finite([(n, p.detach()) for n, p in _trainable(pl_module)])
        if bad is not None:
            self.action = "stop"
            self._fail(trainer, pl_module, f"weight ({bad})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._check_weights(trainer, pl_module)
        self._check_uniform(trainer, pl_module, outputs)

    def _check_uniform(self, trainer, pl_module, outputs) -> None:
        # only SFT's loss is a token cross-entropy whose uniform value is log(V); preference and RL losses are not
        if self.uniform_warned or getattr(pl_module, "data_kind", None) != "sft":
            return
        if trainer.global_step < self.uniform_after_step:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        vocab = _vocab_size(pl_module)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not vocab or vocab < 2:
            return
        uniform = math.log(vocab)
        stuck = abs(float(loss.detach()) - uniform) <= self.uniform_tolerance * uniform  # the step's own loss
        if trainer.world_size > 1:  # every rank must take the same decision, or one waits alone in a collective
            stuck = trainer.strategy.reduce_boolean_decision(stuck, all=True)
        self._uniform_run = self._uniform_run + 1 if stuck else 0
        if self._uniform_run < self.uniform_steps:
            return
        self.uniform_warned = True
        lr = _learning_rate(trainer, pl_module)
        rate = f"The learning rate (optim.lr {lr:g})" if lr is not None else "The learning rate"
        message = (
            f"train/loss has stayed at {uniform:.4f} = log(vocabulary size {vocab}) for {self._uniform_run} batches "
            f"(up to step {trainer.global_step}): the model predicts a uniform distribution over the vocabulary and "
            f"is learning nothing. {rate} is most likely far too high (the weights saturated); "
            "lower optim.lr (1e-5 to 1e-3 for fine-tuning; LoRA up to ~1e-3)"
        )
        log.warning("%s", message)
        if self.action == "stop":
            raise UniformLossError(
                f"{message}. Stopped; nothing was exported. To only warn, use "
                "rlft.callbacks.NonFiniteGuard with action: skip"
            )

    def on_fit_end(self, trainer, pl_module) -> None:
        # callbacks' on_fit_end runs before the module's, which exports: NaN weights never reach the folder
        self._check_weights(trainer, pl_module)


__all__ = ["NonFiniteError", "NonFiniteGuard", "UniformLossError", "likely_cause", "refuse_impossible_settings"]
