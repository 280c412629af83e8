"""A plain Hugging Face folder from any model string: LoRA merged into the base, tokenizer and chat template kept.

The folder loads with ``transformers`` alone (no peft, no rlft) and is what the GGUF and ONNX exporters start
from, so every format sees the same merged weights and the same tokenizer files. A reward model (an rlft reward
folder or ``RewardModel`` checkpoint) exports as ``<Arch>ForSequenceClassification`` with its trained head as
``score``, or is refused when transformers cannot represent the head: never as a causal LM that dropped it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlft.export.card import write_export_card
from rlft.models import load_model, load_tokenizer
from rlft.models.checkpoint import checkpoint_hparams, is_checkpoint
from rlft.models.reward import CONFIG_FILE, HeadNotRepresentable, RewardScorer, write_sequence_classification_folder

log = logging.getLogger(__name__)


def merged_model(model: str, *, dtype: str = "float32") -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` with every LoRA adapter merged into the base weights (frozen, eval mode).

    Args:
        model: Any rlft model string: alias, hub id, folder, adapter folder, ``.ckpt`` or ``.gguf``.
        dtype: Weights dtype of the result; merging itself happens in the dtype the model loads in.
    """
    import peft

    refuse_reward_model(model)
    network = load_model(model, dtype="float32", trainable_adapter=False)
    if isinstance(network, peft.PeftModel):
        network = network.merge_and_unload()
    network = _plain_copy(network)
    if dtype != "float32":
        from rlft.models.loading import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        network = network.to(DTYPES[dtype])
    return network.eval().requires_grad_(False), load_tokenizer(model)


def _plain_copy(network: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model built from its config: a GGUF-loaded model refuses ``save_pretrained`` (its
    config carries the GGUF ``quantization_config``), a rebuilt one does not."""
    config = network.config
    if getattr(config, "quantization_config", None) is None:
        return network
    import transformers

    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=next(network.parameters()).dtype)
    plain.load_state_dict(network.state_dict())
    plain.generation_config = network.generation_config
    return plain


def export_merged(model: str, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write ``model`` as a plain Hugging Face folder (safetensors + tokenizer + chat template) at ``out``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out folder")
    if is_reward_model(model):
        return export_reward_model(model, out, dtype=dtype)
    network, tokenizer = merged_model(model, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    network.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_export_card(out, model, usage="transformers")
    log.info("merged model written to %s", out)
    return out


def is_reward_model(model: str) -> bool:
    """An rlft reward folder (``reward_config.json``) or a ``RewardModel`` checkpoint (its hparams name a head)."""
    if is_checkpoint(model):
        hparams = checkpoint_hparams(model)
        return "head" in hparams and "head_dtype" in hparams
    return (Path(model) / CONFIG_FILE).is_file()


def refuse_reward_model(model: str) -> None:
    """GGUF and ONNX exports hold a causal LM: a reward model's head would be dropped without a word."""
    if is_reward_model(model):
        raise ValueError(
            f"{model} is a reward model; gguf and onnx exports hold a causal LM and would drop its "
            "trained head: use --to merged (an <Arch>ForSequenceClassification folder)"
        )


def export_reward_model(model: str, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write a reward model as an ``<Arch>ForSequenceClassification`` folder (LoRA merged, the trained linear head
    as ``score``) that is also an rlft reward folder; refuse, writing nothing, a head transformers cannot hold."""
    from rlft.models.loading import DTYPES

    out = Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    scorer = RewardScorer.from_pretrained(model)
    backbone, head = scorer.network.backbone, scorer.network.head
    try:
        import peft

        if isinstance(backbone, peft.PeftModel):
            backbone = backbone.merge_and_unload()
        write_sequence_classification_folder(
            out, backbone.to(DTYPES[dtype]), head, scorer.tokenizer, _reward_config(model, dtype)
        )
    except HeadNotRepresentable as error:
        raise HeadNotRepresentable(
            f"cannot export {model} as sequence classification: {error}; nothing written, "
            "use the rlft folder with rlft.models.reward.RewardScorer"
        ) from None
    write_export_card(out, model, usage="sequence_classification")
    log.info("reward model written to %s as sequence classification", out)
    return out


def _reward_config(model: str, dtype: str) -> dict:
    import json

    if is_checkpoint(model):
        hparams = checkpoint_hparams(model)
        config = {"head": hparams["head"], "head_dtype": hparams["head_dtype"], "trained_from": hparams["model"]}
    else:
        config = json.loads((Path(model) / CONFIG_FILE).read_text())
    return {**config, "dtype": dtype, "backbone": "merged" if config.get("backbone") == "adapter" else "full"}
