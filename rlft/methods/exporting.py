"""The end of every fit: the trained network written as a Hugging Face folder (adapter or full weights, tokenizer,
chat template, a README.md model card) that loads without rlft, gathered from the shards first under FSDP2/ZeRO-3.
:class:`HFExport` is mixed into :class:`rlft.methods.base.RLFTModule`; a method overrides :meth:`HFExport.export`
(e.g. the reward model's folder) or :meth:`HFExport.model_card_facts`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from rlft.models.loading import structure_only
from rlft.models.lowp import restore_linears
from rlft.models.model_card import CardFacts, trainer_card_facts, write_model_card
from rlft.strategies import full_state_dict, is_sharded

log = logging.getLogger(__name__)


def export_folder(output_dir: str | Path | None, default_root_dir: str | Path) -> Path:
    """Where a run's final Hugging Face folder goes: ``output_dir``, else ``<default_root_dir>/hf_model`` (beside
    the run's checkpoints and logs, not inside a logger's versioned folder)."""
    return Path(output_dir) if output_dir else Path(default_root_dir) / "hf_model"


class HFExport:
    """Export at the end of fit (mixed into :class:`~rlft.methods.base.RLFTModule`, whose ``model``, ``tokenizer``,
    ``hparams`` and ``build_model`` it uses)."""

    def on_fit_end(self) -> None:
        restore_linears(self)  # the export and anything after fit see the weights as loaded
        if self.trainer.sanity_checking:
            return
        network = None
        if is_sharded(self):
            # every rank takes part in gathering the trained weights from the shards; rank 0 writes them into an
            # unsharded twin, so the exported folder is the full model and never a rank's shard
            state = full_state_dict(self.model, trainable_only=True)
            network = self.unsharded_copy(state) if self.trainer.is_global_zero else None
        if self.trainer.is_global_zero:
            self.export(self.export_dir(), network)
        self.trainer.strategy.barrier("rlft-export")

    def unsharded_copy(self, trained: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A fresh, unsharded network (``build_model``) holding the ``trained`` weights.

        When what is exported is an adapter (LoRA, no ``merge_on_save``), the copy is built on the meta device and
        the trained tensors are put in place: the frozen base is never read again, so exporting costs rank 0 the
        adapter only. Otherwise (a merged or fully fine-tuned export) the base is loaded in full.
        """
        with structure_only(not self.hparams.merge_on_save):
            twin = self.build_model()
        adapter_only = any(hasattr(m, "peft_config") for m in twin.modules())
        if not adapter_only and any(t.is_meta for t in twin.state_dict().values()):
            twin = self.build_model()  # a full model is exported: its frozen tensors must be real
        expected = {n for n, p in twin.named_parameters() if p.requires_grad}
        missing = expected - trained.keys()
        if missing:
            raise RuntimeError(f"gathered weights lack {len(missing)} trained tensors, e.g. {sorted(missing)[:3]}")
        twin.load_state_dict({k: v for k, v in trained.items() if k in expected}, strict=False, assign=True)
        return twin

    def export_dir(self) -> Path:
        return export_folder(self.hparams.output_dir, self.trainer.default_root_dir)

    def model_card_facts(self, usage: str) -> CardFacts:
        """What an exported folder's README.md says (``usage``: the folder kind, see ``rlft.models.model_card``);
        override to add ``notes`` or settings, calling ``super()``."""
        return trainer_card_facts(self, usage)

    def export(self, path: str | Path, network: torch.nn.Module | None = None) -> Path:
        """Save a Hugging Face folder (adapter or full weights + tokenizer + chat template + README.md model card)
        loadable without rlft.

        Args:
            path: The folder.
            network: What to save; default ``self.model`` (a sharded run passes its gathered, unsharded copy).
        """
        network = self.model if network is None else network
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if hasattr(network, "peft_config"):  # the trained adapter only, not a frozen reference copy
            network.save_pretrained(path, selected_adapters=["default"])
        else:
            network.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        write_model_card(path, self.model_card_facts("peft" if hasattr(network, "peft_config") else "transformers"))
        if self.hparams.merge_on_save and hasattr(network, "merge_and_unload"):
            merged = copy.deepcopy(network).merge_and_unload()
            merged.save_pretrained(path / "merged")
            self.tokenizer.save_pretrained(path / "merged")
            write_model_card(path / "merged", self.model_card_facts("transformers"))
        log.info("saved Hugging Face model to %s", path)
        print(f"rlft: final model saved to {path}")
        return path
