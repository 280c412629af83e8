"""Direct Preference Optimization with three interchangeable reference models.

The policy scores chosen and rejected responses in **one** concatenated forward (:func:`pair_logps`). The reference
log-probs come from (``reference``):

* ``adapter`` — the LoRA base with the adapter switched off: no second copy of the weights (default with LoRA).
  When training continues an existing adapter (e.g. an SFT output folder), a frozen copy of that adapter is loaded
  under the name ``ref`` and activated instead, so the reference is the SFT policy, not the raw base;
* ``model`` — a separate frozen model loaded from ``ref_model`` (any model string; default: ``model`` itself);
* ``precomputed`` — computed once at fit start over the train and validation sets (from ``ref_model`` when given,
  else the adapter-disabled base, else the untrained policy), keyed by a hash of each example's tokens and stored
  in ``reference_logps.pt`` next to the checkpoints, so resumed runs and later epochs reuse it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from rlft.data.collate import Collator
from rlft.losses import DPO_LOSS_TYPES, dpo_loss
from rlft.methods.base import OptimizerSettings, RLFTModule
from rlft.models import LoraSettings, is_adapter, load_model
from rlft.models.modes import disable_dropout as zero_dropout
from rlft.models.reference import load_reference_adapter, reference_model
from rlft.models.scoring import (  # noqa: F401
    PairLogps,
    batch_keys,
    causal_lm,
    pair_key,
    pair_logps,
    pair_metrics,
    vocabulary_size,
)
from rlft.registry import resolve
from rlft.strategies import full_weights

log = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.pt"
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------------ method
class DPO(RLFTModule):
    """Direct Preference Optimization (https://arxiv.org/abs/2305.18290) and its loss variants.

    Logs ``{train,val}/rewards/{chosen,rejected,accuracy,margin}`` and ``{train,val}/logps/{chosen,rejected}``.
    To try a new objective, override :meth:`preference_loss` or register a function in
    ``rlft.losses.DPO_LOSS_TYPES`` and select it with ``loss_type``.

    Args:
        beta: Inverse temperature of the implicit reward (IPO's tau for ``loss_type: ipo``).
        loss_type: Key of ``rlft.losses.DPO_LOSS_TYPES`` (``sigmoid``, ``hinge``, ``ipo``, ``robust``) or your own
            ``module:function`` with the same signature (set ``function.length_averaged = True`` if it compares
            length-averaged log-probs).
        label_smoothing: Assumed label-flip rate (conservative DPO with ``sigmoid``, robust DPO).
        rpo_alpha: Weight of RPO's NLL term on the chosen responses; null disables it.
        reference: ``adapter``, ``model`` or ``precomputed`` (see the module docs); default ``adapter`` with LoRA,
            ``model`` without.
        ref_model: Model string of the reference for ``model``/``precomputed``; default: ``model``.
        ref_cache_path: File of precomputed reference log-probs; default ``<checkpoint dir>/reference_logps.pt``.
        disable_dropout: Switch dropout off in the policy (and reference) so log-prob ratios are not noisy.
        share_prompts: Run each pair's common prompt once for both responses (exact: the same log-probs; about a
            third fewer tokens through the network on HH-RLHF). Needs an SDPA model; others ignore it.
    """

    data_kind = "pairs"

    def __init__(
        self,
        model: str,
        lora: LoraSettings | None = LoraSettings(),
        dtype: str = "float32",
        quantization: Literal["4bit", "8bit"] | None = None,
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        optim: OptimizerSettings = OptimizerSettings(lr=5e-6),
        output_dir: str | None = None,
        merge_on_save: bool = False,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        rpo_alpha: float | None = None,
        reference: Literal["adapter", "model", "precomputed"] | None = None,
        ref_model: str | None = None,
        ref_cache_path: str | None = None,
        disable_dropout: bool = True,
        share_prompts: bool = True,
    ) -> None:
        resolve(loss_type, DPO_LOSS_TYPES, "loss_type")  # a typo fails here, not at the first step
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        super().__init__(
            model, lora, dtype, quantization, gradient_checkpointing, attn_implementation, optim, output_dir,
            merge_on_save,
        )  # fmt: skip
        is_peft = self.lora_settings is not None or is_adapter(model)  # known before the network is built
        self.reference_mode = reference or ("adapter" if is_peft else "model")
        if self.reference_mode not in ("adapter", "model", "precomputed"):
            raise ValueError(f"reference must be 'adapter', 'model' or 'precomputed', got {reference!r}")
        if self.reference_mode == "adapter" and not is_peft:
            raise ValueError("reference: adapter needs a LoRA policy (set `lora`), or use reference: model")
        self.ref_model: torch.nn.Module | None = None
        self._ref_cache: dict[str, tuple[float, float]] | None = None

    def on_model_built(self) -> None:
        super().on_model_built()
        hp = self.hparams
        if self.reference_mode == "model":
            self.ref_model = self._load_reference_model()
        if hasattr(self.model, "disable_adapter") and not (self.reference_mode == "precomputed" and hp.ref_model):
            load_reference_adapter(self.model, hp.model)

    # ------------------------------------------------------------------------------------------ reference sources
    def _load_reference_model(self) -> torch.nn.Module:
        hp = self.hparams
        ref = load_model(hp.ref_model or hp.model, dtype=hp.dtype, lora=None, trainable_adapter=False)
        ref.requires_grad_(False).eval()
        zero_dropout(ref)
        policy_vocab, ref_vocab = vocabulary_size(causal_lm(self.model)), vocabulary_size(causal_lm(ref))
        if ref_vocab != policy_vocab:
            raise ValueError(
                f"ref_model {hp.ref_model!r} has a vocabulary of {ref_vocab} tokens but the policy has {policy_vocab}; "
                "the reference must share the policy's tokenizer"
            )
        return ref

    @contextlib.contextmanager
    def reference_network(self) -> Iterator[torch.nn.Module]:
        """The network that plays the reference, ready to run under ``torch.no_grad``."""
        if self.ref_model is not None:
            self.ref_model.eval()
            yield self.ref_model
        elif hasattr(self.model, "disable_adapter"):  # the frozen `ref` adapter, else the adapter switched off
            with reference_model(self.model) as network:
                yield network
        else:  # no LoRA, no reference model: the policy itself (only valid before training, to precompute)
            yield self.model

    def live_reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), self.reference_network() as network:
            logps = pair_logps(network, batch, self.hparams.share_prompts)
        return logps.chosen, logps.rejected

    def reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs ``(chosen [B], rejected [B])``; override to plug in another reference."""
        if self.reference_mode != "precomputed":
            return self.live_reference_logps(batch)
        if self._ref_cache is None:  # `validate`/`test` without `fit`: build (or load) the cache now
            if self._trainer is None:
                raise RuntimeError("reference: precomputed needs a Trainer (the cache is built from its datamodule)")
            self.prepare_reference_cache()
        keys = batch_keys(batch)
        missing = [k for k in keys if k not in self._ref_cache]
        if missing:
            if self.ref_model is None and not hasattr(self.model, "disable_adapter"):
                raise KeyError(
                    f"{len(missing)} examples of this batch have no precomputed reference log-probs and the trained "
                    "policy cannot serve as its own reference; rerun from scratch or set ref_model"
                )
            chosen, rejected = self.live_reference_logps(batch)
            for i, key in enumerate(keys):
                self._ref_cache[key] = (float(chosen[i]), float(rejected[i]))
        values = torch.tensor([self._ref_cache[k] for k in keys], dtype=torch.float32, device=self.device)
        return values[:, 0], values[:, 1]

    # ------------------------------------------------------------------------------------------ precomputation
    def reference_cache_path(self) -> Path:
        if self.hparams.ref_cache_path:
            return Path(self.hparams.ref_cache_path)
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or self.trainer.default_root_dir
        return Path(folder) / CACHE_FILE

    def _reference_source(self) -> str:
        hp = self.hparams
        return f"{hp.ref_model or hp.model}|adapter={hasattr(self.model, 'disable_adapter')}|dtype={hp.dtype}"

    def on_fit_start(self) -> None:
        if self.reference_mode == "precomputed":
            self.prepare_reference_cache()

    def prepare_reference_cache(self) -> None:
        """Load the cache file, compute what it lacks for the train and validation sets, and save it."""
        path = self.reference_cache_path()
        cache: dict[str, tuple[float, float]] = {}
        if path.exists():
            stored = torch.load(path, map_location="cpu", weights_only=False)
            if stored.get("version") == _CACHE_VERSION and stored.get("source") == self._reference_source():
                cache = stored["logps"]
            else:
                log.warning("%s was computed with another reference (%s); recomputing", path, stored.get("source"))
        examples = self._pairs_to_score()
        todo = [e for e in examples if _example_key(e) not in cache]
        if todo:
            self._check_can_compute(path, len(todo))
            self._score_examples(todo, cache)
            if self.trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"version": _CACHE_VERSION, "source": self._reference_source(), "logps": cache}, path)
            log.info("precomputed reference log-probs of %d pairs into %s", len(todo), path)
        else:
            log.info("reusing precomputed reference log-probs from %s", path)
        self._ref_cache = cache

    def _pairs_to_score(self) -> list[dict]:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_set"):
            raise RuntimeError("reference: precomputed needs an rlft.data.PreferenceDataModule as datamodule")
        return list(datamodule.train_set) + list(datamodule.val_set)

    def _check_can_compute(self, path: Path, count: int) -> None:
        policy_is_reference = self.ref_model is None and not hasattr(self.model, "disable_adapter")
        if policy_is_reference and self.trainer.ckpt_path and not self.hparams.ref_model:
            raise RuntimeError(
                f"resuming, but {path} lacks reference log-probs for {count} pairs and the policy (trained in full) "
                "is no longer the reference; restore that file, or set ref_model to the initial model"
            )

    def _score_examples(self, examples: list[dict], cache: dict) -> None:
        ref_from_string = self.hparams.ref_model is not None and self.ref_model is None
        if ref_from_string:  # loaded only for this pass, then freed
            self.ref_model = self._load_reference_model().to(self.device)
        collate = Collator("pairs", self.tokenizer.pad_token_id)
        batch_size = getattr(self.trainer.datamodule.hparams, "eval_batch_size", None) or 8
        try:
            # one gather of sharded weights for the whole pass (every rank scores every example, in step)
            with full_weights(self), torch.no_grad():
                self._score_chunks(examples, batch_size, collate, cache)
        finally:
            if ref_from_string:
                self.ref_model = None

    def _score_chunks(self, examples: list[dict], batch_size: int, collate: Collator, cache: dict) -> None:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(self.device) for k, v in collate(chunk).items()}
            chosen, rejected = self.live_reference_logps(batch)
            for example, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                cache[_example_key(example)] = (c, r)

    # ------------------------------------------------------------------------------------------ loss
    def policy_logps(self, batch: dict) -> PairLogps:
        return pair_logps(self.model, batch, self.hparams.share_prompts)

    def preference_loss(
        self, policy: PairLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example losses and implicit rewards ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``."""
        hp = self.hparams
        chosen, rejected = policy.chosen, policy.rejected
        if getattr(resolve(hp.loss_type, DPO_LOSS_TYPES, "loss_type"), "length_averaged", False):
            chosen, rejected = policy.chosen_avg, policy.rejected_avg
            ref_chosen = ref_chosen / policy.chosen_tokens.clamp(min=1)
            ref_rejected = ref_rejected / policy.rejected_tokens.clamp(min=1)
        return dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=hp.beta, loss_type=hp.loss_type,
            label_smoothing=hp.label_smoothing, rpo_alpha=hp.rpo_alpha,
            chosen_nll=policy.chosen_nll if hp.rpo_alpha is not None else None,
        )  # fmt: skip

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.policy_logps(batch)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = self.preference_loss(policy, ref_chosen, ref_rejected)
        metrics = pair_metrics(policy, chosen_rewards, rejected_rewards)
        if self.hparams.rpo_alpha is not None:
            metrics["nll"] = policy.chosen_nll.detach().mean()
        return losses.mean(), metrics


def _example_key(example: dict) -> str:
    prompt = example["prompt_ids"]
    return pair_key(prompt + example["chosen_ids"], prompt + example["rejected_ids"], len(prompt))
