"""Load a model and tokenizer from one string: hub id, local folder, adapter folder, ``.gguf`` file or alias."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers

from rlft.models.checkpoint import checkpoint_hparams, is_checkpoint, trained_weights
from rlft.models.recompute import CheckpointMode, checkpoint_kwargs
from rlft.models.registry import REGISTRY, pull

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHATML_FALLBACK = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# set by a sharding strategy on ranks that receive their weights from rank 0 (see `structure_only`)
_STRUCTURE_ONLY = contextvars.ContextVar("rlft_structure_only", default=False)
# Tokens that are never real text and so make a safe pad when the tokenizer has none (checked in this order).
_PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<unk>")


@dataclass(frozen=True)  # frozen: a default instance is shared by every signature that uses it
class LoraSettings:
    """LoRA through peft.

    Args:
        r: Rank of the update matrices.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the LoRA input.
        target_modules: Module name suffixes to adapt; None = every linear layer of the architecture except the
            output head (found by inspecting the model, so it works for Llama, GPT-2's Conv1D, OPT, ...).
        modules_to_save: Extra modules trained in full and saved with the adapter (e.g. ``["score"]``).
        use_dora: DoRA (weight-decomposed LoRA, https://arxiv.org/abs/2402.09353): a learned magnitude per output
            feature on top of the low-rank direction update. Rollouts then sample the adapter unmerged (it cannot be
            folded into one matmul exactly) and ``decoder.decode_dtype`` is refused.
        use_rslora: rank-stabilised LoRA (https://arxiv.org/abs/2312.03732): scale by ``alpha / sqrt(r)`` instead of
            ``alpha / r``, so a higher rank does not shrink the update.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False


@dataclass
class ModelRef:
    """What a model string points to after resolution."""

    path: str  # hub id or local folder of the base weights
    gguf_file: str | None = None
    adapter: str | None = None  # peft adapter folder on top of ``path``
    tokenizer_path: str | None = None
    extra: dict = field(default_factory=dict)


def resolve_model(model: str) -> ModelRef:
    """Turn a model string into where its weights, adapter and tokenizer live."""
    if model in REGISTRY:
        path = str(pull(model))
        return ModelRef(path=path, tokenizer_path=path)
    local = Path(os.path.expanduser(model))
    if local.suffix == ".gguf":
        if not local.is_file():
            raise FileNotFoundError(f"GGUF file not found: {local}")
        return ModelRef(path=str(local.parent), gguf_file=local.name, tokenizer_path=str(local.parent))
    if local.is_dir():
        adapter_config = local / "adapter_config.json"
        if adapter_config.exists():
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{adapter_config}: field 'base_model_name_or_path' is empty; cannot find the base")
            base_ref = resolve_model(base)
            has_tokenizer = any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            return ModelRef(
                path=base_ref.path,
                gguf_file=base_ref.gguf_file,
                adapter=str(local),
                tokenizer_path=str(local) if has_tokenizer else base_ref.tokenizer_path,
            )
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"{local} is a folder but has no config.json or adapter_config.json")
        return ModelRef(path=str(local), tokenizer_path=str(local))
    if model.startswith((".", "/", "~")) or local.suffix in (".json", ".safetensors", ".bin"):
        raise FileNotFoundError(f"model path not found: {model}")
    return ModelRef(path=model, tokenizer_path=model)  # a hub id; transformers reports if it cannot be fetched


def _hub_hint(model: str, error: Exception) -> ConnectionError:
    # the hub's own message runs to several sentences of links; its first one says what went wrong. A
    # ConnectionError: every rlft command prints it as one line (a model that cannot be had is the user's to fix)
    reason = re.split(r"(?<=\.)\s", str(error).strip(), maxsplit=1)[0].rstrip(".")
    return ConnectionError(
        f"could not load {model!r}: {reason}. Offline? Use a local folder, a .gguf file or one of "
        f"rlft's offline aliases ({', '.join(sorted(REGISTRY))}); `rlft models pull NAME` prepares one"
    )


def load_tokenizer(model: str, *, padding_side: str = "right") -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token and a chat template (ChatML when the model has none)."""
    if is_checkpoint(model):
        model = checkpoint_hparams(model)["model"]
    ref = resolve_model(model)
    kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file and ref.tokenizer_path == ref.path else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(ref.tokenizer_path, **kwargs)
    except OSError as error:
        raise _hub_hint(model, error) from error
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        vocab = tokenizer.get_vocab()
        candidate = next((t for t in _PAD_CANDIDATES if t in vocab and t != tokenizer.eos_token), None)
        # pad == eos is harmless here because labels and attention masks are explicit, but a distinct pad is clearer
        tokenizer.pad_token = candidate or tokenizer.eos_token
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using ChatML", model)
        tokenizer.chat_template = CHATML_FALLBACK
    tokenizer.padding_side = padding_side
    return tokenizer


def find_linear_targets(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear layer except the output head: LoRA's "all linear layers" default."""
    from transformers.pytorch_utils import Conv1D

    linear_types: tuple[type, ...] = (torch.nn.Linear, Conv1D)
    try:  # quantised layers count as linear too
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # noqa: BLE001 - bitsandbytes is optional and may fail to import without CUDA
        pass
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not output and not name.endswith(("lm_head", "score"))
    }
    if not names:
        raise ValueError(f"no linear layers found in {type(model).__name__}; set lora.target_modules explicitly")
    return sorted(names)


def _quantization_config(quantization: str, dtype: torch.dtype) -> transformers.BitsAndBytesConfig:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("quantization needs bitsandbytes: pip install 'rlft[qlora]'") from error
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"quantization={quantization!r} (QLoRA) needs a CUDA GPU for bitsandbytes kernels and this machine has "
            "none; train with plain LoRA (quantization: null) here, or run on a GPU machine"
        )
    if quantization == "4bit":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    return transformers.BitsAndBytesConfig(load_in_8bit=True)


def is_adapter(model: str) -> bool:
    """Whether ``model`` is a LoRA adapter (an adapter folder, or an rlft checkpoint of a LoRA run), known without
    loading it."""
    if is_checkpoint(model):
        hparams = checkpoint_hparams(model)
        return bool(hparams.get("lora")) or is_adapter(str(hparams["model"]))
    return (Path(model).expanduser() / "adapter_config.json").is_file()


@contextlib.contextmanager
def structure_only(active: bool = True) -> Iterator[None]:
    """Inside, :func:`load_model` builds the network from its config on the meta device without reading weights.

    For sharded training where rank 0 reads the checkpoint and sends each rank its shard (FSDP2): the other ranks
    need the module structure only. Adapters are wrapped as usual (on meta as well); quantised loads and rlft
    checkpoints still read their weights.
    """
    token = _STRUCTURE_ONLY.set(active)
    try:
        yield
    finally:
        _STRUCTURE_ONLY.reset(token)


def _empty_base(ref: ModelRef, auto_class: str, kwargs: dict) -> torch.nn.Module:
    config_kwargs = {"gguf_file": ref.gguf_file} if ref.gguf_file else {}
    config = transformers.AutoConfig.from_pretrained(ref.path, **config_kwargs)
    dtype = kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else getattr(config, "dtype", None)
    extra = {"attn_implementation": kwargs["attn_implementation"]} if "attn_implementation" in kwargs else {}
    with torch.device("meta"):
        return getattr(transformers, auto_class).from_config(config, dtype=dtype or torch.float32, **extra)


def load_model(
    model: str,
    *,
    dtype: str = "float32",
    lora: LoraSettings | None = None,
    quantization: Literal["4bit", "8bit"] | None = None,
    gradient_checkpointing: CheckpointMode = False,
    auto_class: str = "AutoModelForCausalLM",
    attn_implementation: str | None = None,
    trainable_adapter: bool = True,
) -> torch.nn.Module:
    """Load ``model`` (any model string) and optionally wrap it with a new LoRA adapter.

    An adapter folder loads its base and the adapter (trainable when ``trainable_adapter``); passing ``lora`` as
    well then continues training that adapter rather than stacking a second one.
    """
    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization must be null, '4bit' or '8bit', got {quantization!r}")
    if dtype not in DTYPES and dtype != "auto":
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    if is_checkpoint(model):
        return load_checkpoint_model(model, dtype=dtype)
    ref = resolve_model(model)
    torch_dtype = DTYPES.get(dtype, "auto")
    kwargs: dict = {"dtype": torch_dtype}
    if ref.gguf_file:
        kwargs["gguf_file"] = ref.gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization:
        kwargs["quantization_config"] = _quantization_config(quantization, DTYPES.get(dtype, torch.bfloat16))
    try:
        if _STRUCTURE_ONLY.get() and not quantization:
            base = _empty_base(ref, auto_class, kwargs)
        else:
            base = getattr(transformers, auto_class).from_pretrained(ref.path, **kwargs)
    except OSError as error:
        raise _hub_hint(model, error) from error
    if quantization:
        import peft

        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=bool(gradient_checkpointing))
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(gradient_checkpointing))
        base.enable_input_require_grads()
        base.config.use_cache = False
    if ref.adapter:
        import peft

        return peft.PeftModel.from_pretrained(base, ref.adapter, is_trainable=trainable_adapter)
    if lora is None:
        return base
    import peft

    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or find_linear_targets(base),
        modules_to_save=lora.modules_to_save,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type=None,
    )
    return peft.get_peft_model(base, config)


@torch.no_grad()
def supports_packing(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps packed sequences apart given restarting ``position_ids`` (probed on two sequences).

    Most decoders (Llama, Mistral, Qwen, Gemma, GPT-2) do; models that derive positions from the attention mask
    (e.g. OPT) do not, and packing them would silently mix examples.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    first, second = torch.arange(3, 10, device=device)[None], torch.arange(11, 16, device=device)[None]
    separate = torch.cat([model(input_ids=s, use_cache=False).logits for s in (first, second)], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).to(device)[None]
    packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).logits
    model.train(was_training)
    return torch.allclose(separate.float(), packed.float(), atol=1e-3, rtol=1e-3)


def checkpoint_backbone(path: str, dtype: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The base model (with its LoRA adapter, untrained) an rlft checkpoint was trained from, and its hparams."""
    hparams = checkpoint_hparams(path)
    lora = hparams.get("lora")
    lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
    return load_model(hparams["model"], dtype=dtype or hparams.get("dtype", "float32"), lora=lora), hparams


def load_trained(network: torch.nn.Module, path: str) -> torch.nn.Module:
    """Load a checkpoint's trained tensors into ``network``, refusing tensors that do not fit it."""
    weights = trained_weights(path)
    unknown = set(weights) - set(network.state_dict())
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} trained tensors do not fit the rebuilt {type(network).__name__}, "
            f"e.g. {sorted(unknown)[:3]} (a checkpoint of another method or model?)"
        )
    network.load_state_dict(weights, strict=False)
    return network


def load_checkpoint_model(path: str, **overrides) -> torch.nn.Module:
    """Rebuild the policy network stored in an rlft checkpoint (LoRA left unmerged)."""
    return load_trained(checkpoint_backbone(path, overrides.pop("dtype", None))[0], path)
