"""DPO's ``reference: precomputed``: reference log-probs computed once per pair and kept in a file.

Computed at fit start over the train and validation sets (from ``ref_model`` when given, else the adapter-disabled
base, else the untrained policy), keyed by a hash of each pair's tokens (:func:`rlft.models.scoring.pair_key`) and
stored in ``reference_logps.pt`` next to the checkpoints, so resumed runs and later epochs reuse it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from rlft.data.batches import PairBatch
from rlft.data.collate import Collator
from rlft.models.scoring import PairLogps, batch_keys, pair_key
from rlft.strategies import full_weights

log = logging.getLogger(__name__)

CACHE_FILE = "reference_logps.pt"
_CACHE_VERSION = 2  # 2: token counts stored beside the sums


def example_key(example: dict) -> str:
    prompt = example["prompt_ids"]
    return pair_key(prompt + example["chosen_ids"], prompt + example["rejected_ids"], len(prompt))


class PrecomputedReference:
    """The cache of one DPO module: ``{pair key: (chosen, rejected, chosen tokens, rejected tokens)}``.

    ``module`` is the DPO module; it provides ``live_reference_logps`` (what fills the cache), the trainer and
    the settings.
    """

    def __init__(self, module) -> None:
        self.module = module
        self.logps: dict[str, tuple[float, float, int, int]] | None = None

    def path(self) -> Path:
        module = self.module
        if module.hparams.ref_cache_path:
            return Path(module.hparams.ref_cache_path)
        folder = getattr(module.trainer.checkpoint_callback, "dirpath", None) or module.trainer.default_root_dir
        return Path(folder) / CACHE_FILE

    def source(self) -> str:
        """What computed the values: a cache from another reference is recomputed, never reused."""
        hp = self.module.hparams
        return f"{hp.ref_model or hp.model}|adapter={hasattr(self.module.model, 'disable_adapter')}|dtype={hp.dtype}"

    def prepare(self) -> None:
        """Load the cache file, compute what it lacks for the train and validation sets, and save it."""
        module, path = self.module, self.path()
        cache: dict[str, tuple[float, float, int, int]] = {}
        if path.exists():
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored.get("version") == _CACHE_VERSION and stored.get("source") == self.source():
                cache = stored["logps"]
            else:
                log.warning(
                    "%s was computed by another reference or rlft version (%s); recomputing", path, stored.get("source")
                )
        todo = [e for e in self._examples() if example_key(e) not in cache]
        if todo:
            self._check_can_compute(path, len(todo))
            self._score(todo, cache)
            if module.trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"version": _CACHE_VERSION, "source": self.source(), "logps": cache}, path)
            log.info("precomputed reference log-probs of %d pairs into %s", len(todo), path)
        else:
            log.info("reusing precomputed reference log-probs from %s", path)
        self.logps = cache

    def __call__(self, batch: PairBatch) -> PairLogps:
        """The cached reference log-probs of ``batch``; pairs the cache lacks are scored live and added."""
        module = self.module
        if self.logps is None:  # `validate`/`test` without `fit`: build (or load) the cache now
            if module._trainer is None:
                raise RuntimeError("reference: precomputed needs a Trainer (the cache is built from its datamodule)")
            self.prepare()
        keys = batch_keys(batch)
        missing = [k for k in keys if k not in self.logps]
        if missing:
            if self._policy_is_reference():
                raise KeyError(
                    f"{len(missing)} examples of this batch have no precomputed reference log-probs and the trained "
                    "policy cannot serve as its own reference; rerun from scratch or set ref_model"
                )
            self._store(keys, module.live_reference_logps(batch), self.logps)
        values = torch.tensor([self.logps[k] for k in keys], dtype=torch.float64, device=module.device)  # [B, 4]
        sums, counts = values[:, :2].float(), values[:, 2:].long()
        return PairLogps(sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1])

    # ------------------------------------------------------------------ computing
    def _policy_is_reference(self) -> bool:
        return self.module.ref_model is None and not hasattr(self.module.model, "disable_adapter")

    def _examples(self) -> list[dict]:
        datamodule = getattr(self.module.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_set"):
            raise RuntimeError("reference: precomputed needs an rlft.data.PreferenceDataModule as datamodule")
        return list(datamodule.train_set) + list(datamodule.val_set)

    def _check_can_compute(self, path: Path, count: int) -> None:
        module = self.module
        if self._policy_is_reference() and module.trainer.ckpt_path and not module.hparams.ref_model:
            raise RuntimeError(
                f"resuming, but {path} lacks reference log-probs for {count} pairs and the policy (trained in full) "
                "is no longer the reference; restore that file, or set ref_model to the initial model"
            )

    def _score(self, examples: list[dict], cache: dict) -> None:
        module = self.module
        ref_from_string = module.hparams.ref_model is not None and module.ref_model is None
        if ref_from_string:  # loaded only for this pass, then freed
            module.ref_model = module.load_reference_model().to(module.device)
        collate = Collator("pairs", module.tokenizer.pad_token_id)
        batch_size = getattr(module.trainer.datamodule.hparams, "eval_batch_size", None) or 8
        try:
            # one gather of sharded weights for the whole pass (every rank scores every example, in step)
            with full_weights(module), torch.no_grad():
                for start in range(0, len(examples), batch_size):
                    chunk = examples[start : start + batch_size]
                    batch = move_data_to_device(collate(chunk), module.device)
                    self._store([example_key(e) for e in chunk], module.live_reference_logps(batch), cache)
        finally:
            if ref_from_string:
                module.ref_model = None

    @staticmethod
    def _store(keys: list[str], logps: PairLogps, cache: dict) -> None:
        rows = zip(
            logps.chosen.tolist(), logps.rejected.tolist(), logps.chosen_tokens.tolist(), logps.rejected_tokens.tolist()
        )
        for key, row in zip(keys, rows):
            cache[key] = row
