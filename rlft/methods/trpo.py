"""TRPO (Schulman et al. 2015, https://arxiv.org/abs/1502.05477) on the online-RL core, with GRPO's estimator.

One training step samples ``group_size`` responses per prompt and turns their scores into group-relative advantages
(GRPO's estimator, no value network). Each minibatch then takes one trust-region step instead of a gradient step:

1. ``g``: the gradient of the minibatch loss, the negative importance-weighted surrogate
   ``-mean_t(pi_theta(a_t) / pi_old(a_t) * A_t)`` (no clipping; plus ``kl.coef`` times the KL to the reference
   when that is on).
2. ``F v``: Fisher-vector products, the Hessian-vector products of the mean over response tokens of the exact
   (full-vocabulary) ``KL(pi_theta_k || pi_theta)`` at ``theta_k`` (double backward through the log-probs), plus
   ``damping * v``.
3. The natural-gradient direction ``d = F^-1 (-g)`` by conjugate gradient, scaled to the radius ``max_kl``
   (``s = sqrt(2 max_kl / d^T F d) d``), then a backtracking line search on the true surrogate improvement and the
   true mean KL (:mod:`rlft.trust_region`).
4. The accepted step is written through the Lightning optimiser (plain SGD, lr 1, gradient ``-step``), so
   ``trainer.global_step`` counts it and checkpoints resume it.

The loop, the reference KL, validation and the statistics are the online core's (:mod:`rlft.methods.online`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rlft.methods.grpo import GRPO
from rlft.models.scoring import plain_head
from rlft.models.unwrap import causal_lm
from rlft.outputs import LossOutput
from rlft.rl.kl import KLSettings
from rlft.rl.logps import token_logps
from rlft.rl.rollout import Rollout
from rlft.rl_losses import aggregate_tokens
from rlft.strategies import is_sharded
from rlft.trust_region import backtracking_line_search, conjugate_gradient, trust_region_step

_SHARDED_STRATEGIES = ("DeepSpeed", "FSDP", "ModelParallel")


def _flat(tensors: list[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    """Per-parameter tensors (None where a parameter got no gradient) as one flat fp32 vector."""
    return torch.cat(
        [(t if t is not None else torch.zeros_like(p)).reshape(-1).float() for t, p in zip(tensors, params)]
    )


def _unflat(vector: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector as tensors shaped (and typed) like ``params``."""
    sizes = [p.numel() for p in params]
    return [v.view_as(p).to(p.dtype) for v, p in zip(vector.split(sizes), params)]


class TRPO(GRPO):
    """Trust Region Policy Optimization with group-relative advantages.

    Logs what GRPO logs (``train/reward``, ``train/policy_loss``, ``train/entropy``, ...) plus
    ``train/trpo/step_fraction`` (the accepted fraction of the full step; 0 when the line search rejected it),
    ``train/trpo/expected_improvement`` (first-order surrogate improvement of the accepted fraction),
    ``train/trpo/actual_improvement`` (its true improvement, 0 when no step was taken), ``train/trpo/kl`` (the exact
    mean per-token KL from the policy before the step to the policy after it; 0 when no step was taken),
    ``train/trpo/backtracks`` and ``train/trpo/grad_norm``.

    The optimiser is plain SGD with lr 1 that applies the accepted step (``optim``'s learning rate and schedule and
    ``max_grad_norm`` do not apply). Sharded strategies (DeepSpeed, FSDP) are refused; under DDP the gradient and
    every Fisher-vector product are averaged over ranks, so every rank takes the same step.

    The KL and the Fisher use the full next-token distribution: the model's logits must be ``hidden @ W.T`` (models
    that cap or rescale logits are refused), and the response positions' ``[n, R, V]`` log-probs of a
    (micro-)batch are held in memory: set ``micro_batch_size`` to bound them (the line search then recomputes the
    pre-step distributions part by part). Attention runs through SDPA's math kernel in the Fisher's forward (the fused
    kernels have no double backward); ``attn_implementation: flash_attention_2`` cannot be used.

    Args:
        max_kl: The trust region ``delta``: the largest mean per-token KL of one step.
        damping: ``lambda`` added to the Fisher (``F + lambda I``), which keeps conjugate gradient stable.
        cg_iterations: Conjugate-gradient iterations (Fisher-vector products) per step.
        max_backtracks: Step fractions (1, 1/2, 1/4, ...) the line search tries before giving up on the step.
        accept_ratio: Least ratio of the true to the first-order improvement the line search accepts.
        fisher_fraction: Share of the minibatch's rows (spread evenly over it) the Fisher-vector products use; the
            paper uses 0.1 to make conjugate gradient cost about as much as the gradient. The line search's KL is
            always measured on every row.
        group_size: Responses per prompt (the advantages are GRPO's group-relative ones).
        kl: The KL-to-reference block; TRPO's default is off (``coef: 0``; the trust region bounds the step).
        loss_aggregation: How the surrogate's token terms become one value per sequence; ``token`` (default) is the
            paper's mean over all state-action pairs of the minibatch.
    """

    default_kl = KLSettings(coef=0.0, estimator="k3", placement="loss")

    def __init__(
        self,
        model: str,
        max_kl: float = 0.01,
        damping: float = 0.1,
        cg_iterations: int = 10,
        max_backtracks: int = 10,
        accept_ratio: float = 0.1,
        fisher_fraction: float = 1.0,
        group_size: int = 4,
        kl: KLSettings = KLSettings(),
        loss_aggregation: str = "token",
        **kwargs,
    ) -> None:
        if max_kl <= 0:
            raise ValueError(f"max_kl must be > 0, got {max_kl}")
        if kwargs.get("gradient_checkpointing") == "selective":
            raise ValueError(
                "TRPO differentiates the KL twice (Fisher-vector products), which selective activation checkpointing "
                "cannot do; use gradient_checkpointing: true (whole layers) or false"
            )
        if not 0 < fisher_fraction <= 1:
            raise ValueError(f"fisher_fraction must be in (0, 1], got {fisher_fraction}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        for name, value in (("cg_iterations", cg_iterations), ("max_backtracks", max_backtracks)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        super().__init__(model, group_size=group_size, kl=kl, loss_aggregation=loss_aggregation, **kwargs)

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        strategy = self.trainer.strategy
        names = [cls.__name__ for cls in type(strategy).__mro__]
        if any(key in name for name in names for key in _SHARDED_STRATEGIES) or is_sharded(self):
            raise ValueError(
                f"TRPO does not run under the sharded strategy {type(strategy).__name__}: its conjugate-gradient "
                "step needs every trainable parameter and its gradient whole on each process; use one process or "
                "DDP (e.g. -c configs/trainer/ddp.yaml)"
            )
        if self.trainer.precision == "16-mixed":
            raise ValueError(
                "TRPO writes its step as an unscaled gradient, which fp16 loss scaling would rescale; "
                "use precision bf16-mixed or 32-true"
            )

    def on_model_built(self) -> None:
        super().on_model_built()
        if plain_head(causal_lm(self.model)) is None:
            raise ValueError(
                f"TRPO needs the full next-token distribution as hidden @ W.T, but {type(self.model).__name__} caps "
                "or rescales its logits (or has an adapted LM head); pick another model or leave lm_head out of "
                "the LoRA target modules"
            )

    def configure_optimizers(self):
        """Plain SGD with lr 1 and no schedule: ``optimizer.step()`` applies ``-grad``, the accepted step."""
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=1.0)

    # ------------------------------------------------------------------ the objective
    def policy_loss(self, batch: Rollout, logps: torch.Tensor, advantages: torch.Tensor) -> LossOutput:
        """The negative importance-weighted surrogate ``-ratio_t * A_t`` per token, aggregated per sequence (no
        clipping: the trust region bounds the step)."""
        mask = batch.response_mask.to(logps.dtype)
        log_ratio = logps - batch.logps
        ratio = torch.exp(log_ratio)
        losses = aggregate_tokens(
            -advantages * ratio, mask, self.hparams.loss_aggregation, self.sampling.max_new_tokens
        )
        with torch.no_grad():
            count = mask.sum(-1).clamp(min=1.0)
            stats = {"ratio": (ratio * mask).sum(-1) / count, "clipfrac": torch.zeros_like(count)}
        return LossOutput(losses, stats)

    def response_log_probs(self, batch: Rollout) -> torch.Tensor:
        """``[n, R, V]`` log-probs of the whole vocabulary at each response position (at the sampling temperature).

        Differentiating the result twice (the Fisher) needs SDPA's math kernel: call it, and take the gradients,
        inside ``sdpa_kernel([SDPBackend.MATH])`` (recomputation under gradient checkpointing then uses it too).
        """
        _, _, hidden = token_logps(
            self.model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_ids.shape[1],
            with_logps=False,
            with_hidden=True,
            share_prompts=self.hparams.share_prompts,
        )
        head = plain_head(causal_lm(self.model))
        temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        logits = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float() / temperature
        return logits.log_softmax(-1)

    @staticmethod
    def token_kl(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Exact ``KL(old || new)`` per position of ``[n, R, V]`` log-probs: ``sum_v p_old (log p_old - log p_new)``."""
        return (old.exp() * (old - new)).sum(-1)

    # ------------------------------------------------------------------ the step
    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks (itself in one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="mean")

    def update_minibatch(self, batch: Rollout) -> dict[str, torch.Tensor]:
        """One trust-region step on a minibatch (micro-batched like the core's update); returns its statistics."""
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        token_mean = hp.loss_aggregation == "token"
        world = 1 if self._trainer is None else self.trainer.world_size
        tokens = self.sum_over_processes(batch.response_mask.float().sum()).clamp(min=1.0)
        parts = batch.split(hp.micro_batch_size or len(batch))
        # each part's weight in this rank's share of the global mean: token means over the global minibatch's tokens
        loss_shares = [p.response_mask.sum() * world / tokens if token_mean else len(p) / len(batch) for p in parts]

        # the policy at theta_k: its full distributions (the line search's KL reference; kept for one part, else
        # recomputed part by part so micro-batches bound the memory) and, where the rollout did not score them, its
        # token log-probs (the surrogate's pi_old)
        olds: list[torch.Tensor | None] = []
        with torch.no_grad():
            for i, part in enumerate(parts):
                old = self.response_log_probs(part)
                if part.logps is None:
                    parts[i] = _with_logps(part, old)
                olds.append(old if len(parts) == 1 else None)

        # 1. the loss and its gradient g at theta_k
        g = torch.zeros(sum(p.numel() for p in params), device=self.device)
        loss0, rows = torch.zeros((), device=self.device), {}
        for part, share in zip(parts, loss_shares):
            out = self.minibatch_loss(part)
            loss = out.loss * share
            g += _flat(torch.autograd.grad(loss, params, allow_unused=True), params)
            loss0 += loss.detach()
            for name, value in out.stats.items():
                value = value.detach().float()
                rows.setdefault(name, []).append(value.expand(len(part)) if value.dim() == 0 else value)
        g = self._reduce(g)
        loss0 = self._reduce(loss0)

        # 2. Fisher-vector products: the Hessian of the mean KL(pi_k || pi_theta) at theta_k (optionally on a spread
        # subset of the rows, as the paper does), plus damping
        def mean_kl(part: Rollout, old: torch.Tensor, new: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
            # this rank's share of the global token mean over `count` tokens
            mask = part.response_mask.to(new.dtype)
            return (self.token_kl(old, new) * mask).sum() * world / count

        fisher = (
            batch
            if hp.fisher_fraction >= 1
            else batch.select(_spread_rows(len(batch), hp.fisher_fraction, self.device))
        )
        fisher_tokens = self.sum_over_processes(fisher.response_mask.float().sum()).clamp(min=1.0)
        fisher_parts = fisher.split(hp.micro_batch_size or len(fisher))

        def kl_gradient(part: Rollout) -> torch.Tensor:
            new = self.response_log_probs(part)  # at theta_k: the KL's reference is the same distribution, detached
            kl = mean_kl(part, new.detach(), new, fisher_tokens)
            return _flat(torch.autograd.grad(kl, params, create_graph=True, allow_unused=True), params)

        cached: list[torch.Tensor] | None = None  # one part: one forward serves every product (set below)

        def fvp(v: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(v)
            for part in fisher_parts:
                grad_kl = cached[0] if cached is not None else kl_gradient(part)
                total += _flat(
                    torch.autograd.grad(grad_kl @ v, params, retain_graph=cached is not None, allow_unused=True), params
                )
            return self._reduce(total) + hp.damping * v

        # 3. natural-gradient direction, scaled to the trust region, then the line search on the true KL; the fused
        # attention kernels have no double backward (nor may a checkpointed layer recompute with another kernel)
        with sdpa_kernel([SDPBackend.MATH]):
            cached = [kl_gradient(fisher_parts[0])] if len(fisher_parts) == 1 else None
            direction = conjugate_gradient(fvp, -g, iterations=hp.cg_iterations)
            step = trust_region_step(direction, fvp, hp.max_kl)
        cached = None  # frees the Fisher's graph before the line search
        expected = float(-g @ step)
        start = [p.detach().clone() for p in params]
        deltas = _unflat(step, params)

        @torch.no_grad()
        def move(fraction: float) -> None:  # the trainable parameters to theta_k + fraction * step, in place
            for p, p0, d in zip(params, start, deltas):
                p.copy_(p0 + fraction * d if fraction else p0)

        @torch.no_grad()
        def evaluate(fraction: float) -> tuple[float, float]:
            loss, kl = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
            for i, part in enumerate(parts):
                old = olds[i]
                if old is None:
                    move(0.0)
                    old = self.response_log_probs(part)
                move(fraction)
                loss += self.minibatch_loss(part).loss * loss_shares[i]
                kl += mean_kl(part, old, self.response_log_probs(part), tokens)
            return float(loss0 - self._reduce(loss)), float(self._reduce(kl))

        fraction, info = backtracking_line_search(
            evaluate,
            step,
            expected,
            max_backtracks=hp.max_backtracks,
            accept_ratio=hp.accept_ratio,
            max_kl=hp.max_kl,
        )
        move(0.0)  # back to theta_k: the optimiser writes the step

        # 4. the accepted step through the Lightning optimiser (SGD, lr 1): theta_k - (-fraction * step)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        for p, d in zip(params, deltas):
            p.grad = -fraction * d
        optimizer.step()
        optimizer.zero_grad()

        stats = {name: torch.cat(values).mean() for name, values in rows.items()}
        accepted = fraction > 0
        stats.update(
            {
                "loss": loss0,
                "trpo/step_fraction": fraction,
                "trpo/expected_improvement": info["expected_improvement"] if accepted else expected,
                "trpo/actual_improvement": info["actual_improvement"] if accepted else 0.0,
                "trpo/kl": info["kl"] if accepted else 0.0,
                "trpo/backtracks": info["backtracks"],
                "trpo/grad_norm": g.norm(),
            }
        )
        return {name: torch.as_tensor(value, device=self.device).float() for name, value in stats.items()}


def _spread_rows(size: int, fraction: float, device: torch.device) -> torch.Tensor:
    """``ceil(fraction * size)`` row indices spread evenly over ``0 .. size - 1`` (so every prompt group is seen)."""
    count = max(1, math.ceil(fraction * size))
    return torch.linspace(0, size - 1, count).round().long().unique().to(device)


def _with_logps(part: Rollout, log_probs: torch.Tensor) -> Rollout:
    """``part`` with its old token log-probs gathered from the full ``[n, R, V]`` log-probs."""
    logps = log_probs.gather(-1, part.response_ids.unsqueeze(-1)).squeeze(-1)
    return replace(part, logps=logps * part.response_mask.to(logps.dtype))
