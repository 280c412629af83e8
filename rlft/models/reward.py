"""The reward network (a causal-LM body plus a scalar head), its exported folder, and the scorer that RL and
evaluation call for rewards (an :class:`rlft.models.scorer.ExchangeScorer`).

The reward of a sequence is the head applied to the final hidden state of its **last non-padding token**, located
from the attention mask, so left and right padding give the same reward. Score text in two lines::

    from rlft.models.reward import RewardScorer
    rewards = RewardScorer.from_pretrained("runs/rm/hf_model").score(["How do I boil an egg?"], ["Simmer it 8 min."])
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from rlft.data.encoding import encode_conversation
from rlft.data.padding import pad
from rlft.models.loading import checkpoint_backbone, load_model, load_tokenizer, load_trained
from rlft.models.modes import inference
from rlft.models.scoring import flat_last_positions, position_ids_from_mask
from rlft.models.unwrap import causal_lm
from rlft.registry import resolve

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"
SEQUENCE_CLASSIFICATION = "sequence_classification"  # reward_config's "format" of a folder transformers loads whole


class HeadNotRepresentable(ValueError):
    """The trained head has no exact ``<Arch>ForSequenceClassification`` equivalent (a bias-free linear ``score``)."""


def _zero_linear(hidden: int) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1)
    # every reward starts at exactly 0 (BT loss log 2): final hidden states of LMs are large, and a random
    # projection of them gives big, arbitrary initial rewards that the first steps must first unlearn
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def _linear_head(hidden: int) -> torch.nn.Module:
    return _zero_linear(hidden)


def _mlp_head(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU(), _zero_linear(hidden))


REWARD_HEADS: dict[str, Callable[[int], torch.nn.Module]] = {"linear": _linear_head, "mlp": _mlp_head}
"""Scalar heads by name: ``hidden_size -> module mapping [..., hidden] to [..., 1]``."""


class RewardNetwork(torch.nn.Module):
    """A causal LM's transformer body (its LM head is never run) and a scalar head.

    Args:
        backbone: A causal LM, optionally wrapped by peft.
        head: Module mapping the final hidden state to one number.
    """

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward of each (left- or right-padded) row, read at its last real token (``[B]``)."""
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
        }
        return self.score_at(inputs, flat_last_positions(attention_mask))

    def score_at(self, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
        """Rewards read at ``positions`` of the flattened ``[rows * T]`` hidden states of one forward on ``inputs``
        (any layout: padded, packed, shared prompts)."""
        lm = causal_lm(self.backbone)
        hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[positions]
        head_dtype = next(self.head.parameters()).dtype
        return self.head(hidden.to(head_dtype)).squeeze(-1).float()


def write_reward_folder(path: Path, backbone, head, tokenizer, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(backbone, "peft_config"):  # a stale adapter from an earlier run would shadow the full weights
        for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            (path / stale).unlink(missing_ok=True)
    backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    (path / CONFIG_FILE).write_text(json.dumps({"format": "rlft", **config}, indent=2))


def sequence_classification_model(lm: torch.nn.Module, head: torch.nn.Module, pad_token_id: int):
    """``(model, head)``: an ``<Arch>ForSequenceClassification`` whose ``score`` gives exactly the rewards of ``lm``
    (a plain causal LM, LoRA already merged) plus ``head``, and the equivalent rlft head (bias 0) for that model.

    transformers' ``score`` is a bias-free ``Linear(hidden, 1)``. A zero bias drops out; a non-zero one is folded
    into the final norm's bias where the architecture has one (GPT-2, OPT: ``w.(h + b w/|w|^2) = w.h + b``).
    Anything else (the mlp head, a bias under a bias-free RMSNorm) raises :class:`HeadNotRepresentable`: a folder
    that loads with a freshly initialised ``score`` would give different rewards without a warning anyone reads.
    """
    weight, bias = _linear_parts(head)
    base = lm.base_model
    state = dict(base.state_dict())
    if bias != 0.0:
        key = _final_norm_bias(base)
        if key is None or not weight.any():
            raise HeadNotRepresentable(
                f"the reward head has a bias ({bias:.4g}) that {type(lm).__name__} cannot carry (transformers' score "
                "has no bias and its final norm none either)"
            )
        shift = bias * weight.double() / weight.double().dot(weight.double())
        state[key] = (state[key].double() + shift).to(state[key].dtype)
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    # transformers reads the reward at the rightmost token that is not pad_token_id, and refuses batches without one
    config.pad_token_id = pad_token_id
    config.get_text_config().pad_token_id = pad_token_id
    dtype = next(lm.parameters()).dtype
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    config.architectures = [type(model).__name__]
    score = getattr(model, "score", None)
    if not isinstance(score, torch.nn.Linear) or score.bias is not None:
        raise HeadNotRepresentable(f"{type(model).__name__} has no bias-free linear `score` to carry the reward head")
    model.base_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        score.weight.copy_(weight[None].to(dtype))
    folded = _zero_linear(weight.numel())
    with torch.no_grad():
        folded.weight.copy_(weight[None])
    return model.eval(), folded.to(next(head.parameters()).dtype)


def _linear_parts(head: torch.nn.Module) -> tuple[torch.Tensor, float]:
    state = head.state_dict()
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        raise HeadNotRepresentable(
            f"a {type(head).__name__} reward head (e.g. `head: mlp`) has no transformers sequence-classification "
            "equivalent; only the `linear` head exports"
        )
    bias = float(state["bias"].item()) if "bias" in state else 0.0
    return state["weight"].detach().float().reshape(-1).cpu(), bias


def _final_norm_bias(base: torch.nn.Module) -> str | None:
    """State-dict key of the bias of the norm that produces ``last_hidden_state``, if it has one."""
    decoder = getattr(base, "decoder", None)
    if decoder is not None and getattr(decoder, "project_out", None) is not None:  # OPT-350m projects after it
        return None
    for name in ("ln_f", "decoder.final_layer_norm", "final_layer_norm"):
        try:
            module = base.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(getattr(module, "bias", None), torch.Tensor):
            return f"{name}.bias"
    return None


def write_sequence_classification_folder(path: Path, lm, head, tokenizer, config: dict) -> None:
    """A folder that is both an ``<Arch>ForSequenceClassification`` checkpoint with the trained head as ``score``
    and an rlft reward folder (:meth:`RewardScorer.from_pretrained`); raises :class:`HeadNotRepresentable` before
    writing anything when the head has no exact transformers equivalent."""
    import peft

    if isinstance(lm, peft.PeftModel):
        lm = copy.deepcopy(lm).merge_and_unload()
    model, folded = sequence_classification_model(lm, head, tokenizer.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        (path / stale).unlink(missing_ok=True)  # an adapter would make transformers load its base instead
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in folded.state_dict().items()}, str(path / HEAD_FILE))
    config = {**config, "format": SEQUENCE_CLASSIFICATION, "sequence_classification_class": type(model).__name__}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


class RewardScorer:
    """Scores ``(prompt, completion)`` pairs with a trained reward model; what RL methods call for rewards, and an
    :class:`rlft.models.scorer.ExchangeScorer` for evaluation.

    Scoring runs without gradients and in eval mode, and restores the network's mode after: a scorer wrapped
    around the network being trained (as :class:`rlft.callbacks.RewardAccuracyCallback` does, no copy of the
    weights) leaves it training. :meth:`from_pretrained` networks are in eval mode for good.

    Args:
        network: The :class:`RewardNetwork`.
        tokenizer: Its tokenizer (with chat template).
        max_length: Longer conversations keep their end (the reply the reward judges).
        batch_size: Sequences per forward.
    """

    def __init__(self, network: RewardNetwork, tokenizer, *, max_length: int = 1024, batch_size: int = 8) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", **kwargs) -> RewardScorer:
        """Load an exported reward-model folder or an rlft ``RewardModel`` checkpoint (``.ckpt``)."""
        path = Path(path)
        if path.suffix == ".ckpt":
            return cls(_network_from_checkpoint(str(path)).eval(), load_tokenizer(str(path)), **kwargs).to(device)
        config_file = path / CONFIG_FILE
        if not config_file.exists():
            raise FileNotFoundError(
                f"{path} is not a reward-model folder (no {CONFIG_FILE}); pass the folder RewardModel exported at the "
                "end of training (`output_dir`, default <log dir>/hf_model) or a RewardModel .ckpt"
            )
        config = json.loads(config_file.read_text())
        if config.get("format") == SEQUENCE_CLASSIFICATION:
            # the folder is a transformers sequence-classification checkpoint: its inner model is the backbone
            # (RewardNetwork only runs `.base_model`), and loading it as a causal LM would report a missing lm_head
            dtype = getattr(torch, config.get("dtype", "float32"))
            backbone = transformers.AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
        else:
            backbone = load_model(str(path), dtype=config.get("dtype", "float32"), trainable_adapter=False)
        hidden = causal_lm(backbone).config
        head = resolve(config["head"], REWARD_HEADS, "reward head")(hidden.get_text_config().hidden_size)
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
        head = head.to(getattr(torch, config.get("head_dtype", "float32")))
        network = RewardNetwork(backbone, head).requires_grad_(False).eval()
        return cls(network, load_tokenizer(str(path)), **kwargs).to(device)

    def to(self, device: str | torch.device) -> RewardScorer:
        self.network.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def encode(self, prompt: list[dict] | str, completion: str) -> list[int]:
        """Token ids of the prompt plus the completion as the final assistant turn (as in training)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = encode_conversation(self.tokenizer, [*messages, {"role": "assistant", "content": completion}]).input_ids
        return ids[-self.max_length :]

    def score(self, prompts: Sequence[list[dict] | str], completions: Sequence[str]) -> torch.Tensor:
        """Reward of each completion given its prompt: float ``[N]`` on the CPU.

        Args:
            prompts: Chat messages (``[{"role": "user", "content": ...}, ...]``) or plain user strings.
            completions: The assistant replies to score, one per prompt.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; pass one per prompt")
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions)]
        scores = []
        pad_id = self.tokenizer.pad_token_id
        with inference(self.network):  # no grad, eval mode, the network's own mode restored after
            for start in range(0, len(sequences), self.batch_size):
                chunk = sequences[start : start + self.batch_size]
                ids, mask = pad(chunk, pad_id), pad([[1] * len(s) for s in chunk], 0)
                scores.append(self.network(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    __call__ = score

    def score_exchanges(self, prompts: Sequence[list[dict] | str], responses: Sequence[str]) -> list[float]:
        """:meth:`score` as a list of floats (the :class:`rlft.models.scorer.ExchangeScorer` protocol)."""
        return [float(x) for x in self.score(prompts, responses).tolist()]


def _network_from_checkpoint(path: str) -> RewardNetwork:
    """Rebuild a ``RewardModel`` checkpoint's network from its hyperparameters and trained weights."""
    backbone, hparams = checkpoint_backbone(path)
    lm = causal_lm(backbone)
    head = resolve(hparams.get("head", "linear"), REWARD_HEADS, "reward head")(lm.config.get_text_config().hidden_size)
    network = RewardNetwork(backbone, head.to(getattr(torch, hparams.get("head_dtype", "float32"))))
    return load_trained(network, path).requires_grad_(False)
