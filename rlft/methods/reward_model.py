"""Reward model: a causal-LM backbone plus a scalar head, trained with the Bradley-Terry pairwise loss.

The reward of a sequence is the head applied to the final hidden state of its **last non-padding token**, located
from the attention mask, so left and right padding give the same reward (position ids are rebuilt from the mask
too). The export is a folder with the backbone (PEFT adapter or full weights), the tokenizer,
``reward_head.safetensors`` and ``reward_config.json``; score text with it in two lines::

    from rlft.methods.reward_model import RewardScorer
    rewards = RewardScorer.from_pretrained("runs/rm/hf_model").score(["How do I boil an egg?"], ["Simmer it 8 min."])
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from rlft.data.encoding import encode_conversation
from rlft.eval.metrics import pairwise_auroc
from rlft.losses import bradley_terry_loss
from rlft.methods.base import OptimizerSettings, RLFTModule
from rlft.methods.pair_scoring import (  # noqa: F401 - last_token_index re-exported
    flat_last_positions,
    last_token_index,
    pair_layout,
    position_ids_from_mask,
)
from rlft.models import LoraSettings, load_model, load_tokenizer

log = logging.getLogger(__name__)

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"


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
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                  "position_ids": position_ids_from_mask(attention_mask)}  # fmt: skip
        return self.score_at(inputs, flat_last_positions(attention_mask))

    def score_at(self, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
        """Rewards read at ``positions`` of the flattened ``[rows * T]`` hidden states of one forward on ``inputs``
        (any layout: padded, packed, shared prompts)."""
        lm = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[positions]
        head_dtype = next(self.head.parameters()).dtype
        return self.head(hidden.to(head_dtype)).squeeze(-1).float()


class RewardModel(RLFTModule):
    """Pairwise reward model (InstructGPT, https://arxiv.org/abs/2203.02155) with a Bradley-Terry loss.

    Logs ``train/loss``, ``{train,val}/rewards/{chosen,rejected,margin}``, ``train/accuracy``, and over the whole
    validation set ``val/loss``, ``val/accuracy`` (share of pairs ranked right) and ``val/auroc`` (chosen vs
    rejected rewards pooled).

    Args:
        head: ``linear`` or ``mlp`` (2 layers) — see ``REWARD_HEADS``.
        margin: Constant margin ``m`` in ``-log sigmoid(r_c - r_r - m)``; null for none.
        center_coef: Weight of ``(r_c + r_r)^2`` that keeps rewards centred on 0 (0 disables it).
        head_dtype: Keep the head in this dtype (``float32`` is stable even with a bf16 backbone).
        share_prompts: Run each pair's common prompt once for both responses (exact; see ``rlft.methods.DPO``).
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
        optim: OptimizerSettings = OptimizerSettings(lr=1e-4),
        output_dir: str | None = None,
        merge_on_save: bool = False,
        head: str = "linear",
        margin: float | None = None,
        center_coef: float = 0.0,
        head_dtype: str = "float32",
        share_prompts: bool = True,
    ) -> None:
        if head not in REWARD_HEADS:
            raise ValueError(f"unknown reward head {head!r}; choose one of {sorted(REWARD_HEADS)}")
        super().__init__(
            model, lora, dtype, quantization, gradient_checkpointing, attn_implementation, optim, output_dir,
            merge_on_save,
        )  # fmt: skip

    def build_model(self) -> RewardNetwork:
        backbone = super().build_model()
        lm = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        hidden = lm.config.get_text_config().hidden_size
        head = REWARD_HEADS[self.hparams.head](hidden).to(getattr(torch, self.hparams.head_dtype))
        return RewardNetwork(backbone, head)

    # ------------------------------------------------------------------------------------------ loss
    def pair_rewards(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of chosen and rejected (``[B]`` each) from one forward over both."""
        layout = pair_layout(self.model.backbone, batch, self.hparams.share_prompts)
        rewards = self.model.score_at(layout.inputs, layout.last)
        n = len(rewards) // 2
        return rewards[:n], rewards[n:]

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.pair_rewards(batch)
        losses = bradley_terry_loss(chosen, rejected, margin=self.hparams.margin, center_coef=self.hparams.center_coef)
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": (chosen > rejected).float().mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(),
        }
        return losses.mean(), metrics

    # ------------------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_rewards: list[torch.Tensor] = []
        self._val_losses: list[torch.Tensor] = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        chosen, rejected = self.pair_rewards(batch)
        losses = bradley_terry_loss(chosen, rejected, margin=self.hparams.margin, center_coef=self.hparams.center_coef)
        self._val_rewards.append(torch.stack([chosen, rejected], dim=-1))
        self._val_losses.append(losses)

    def on_validation_epoch_end(self) -> None:
        if not self._val_rewards:
            return
        rewards = self.all_gather(torch.cat(self._val_rewards)).reshape(-1, 2).float()
        losses = self.all_gather(torch.cat(self._val_losses)).reshape(-1)
        chosen, rejected = rewards[:, 0], rewards[:, 1]
        self.log("val/loss", losses.mean(), prog_bar=True)
        self.log_dict({
            "val/accuracy": (chosen > rejected).float().mean(),
            "val/auroc": torch.tensor(pairwise_auroc(chosen.tolist(), rejected.tolist())),
            "val/rewards/chosen": chosen.mean(),
            "val/rewards/rejected": rejected.mean(),
            "val/rewards/margin": (chosen - rejected).mean(),
        })  # fmt: skip

    # ------------------------------------------------------------------------------------------ export
    def reward_config(self) -> dict:
        hp = self.hparams
        return {
            "head": hp.head,
            "head_dtype": hp.head_dtype,
            "dtype": hp.dtype,
            "trained_from": hp.model,
            "backbone": "adapter" if hasattr(self.model.backbone, "peft_config") else "full",
        }

    def export(self, path: str | Path) -> Path:
        """Write the folder that :meth:`RewardScorer.from_pretrained` loads (backbone, tokenizer, head, config)."""
        path = Path(path)
        _write_reward_folder(path, self.model.backbone, self.model.head, self.tokenizer, self.reward_config())
        if self.hparams.merge_on_save and hasattr(self.model.backbone, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(self.model.backbone).merge_and_unload()
            _write_reward_folder(path / "merged", merged, self.model.head, self.tokenizer,
                                 {**self.reward_config(), "backbone": "full"})  # fmt: skip
        print(f"rlft: reward model saved to {path}")
        return path


def _write_reward_folder(path: Path, backbone, head, tokenizer, config: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if not hasattr(backbone, "peft_config"):  # a stale adapter from an earlier run would shadow the full weights
        for stale in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            (path / stale).unlink(missing_ok=True)
    backbone.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / HEAD_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


class RewardScorer:
    """Scores ``(prompt, completion)`` pairs with a trained reward model; what RL methods call for rewards.

    Args:
        network: The :class:`RewardNetwork`.
        tokenizer: Its tokenizer (with chat template).
        max_length: Longer conversations keep their end (the reply the reward judges).
        batch_size: Sequences per forward.
    """

    def __init__(self, network: RewardNetwork, tokenizer, *, max_length: int = 1024, batch_size: int = 8) -> None:
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", **kwargs) -> RewardScorer:
        """Load an exported reward-model folder or an rlft ``RewardModel`` checkpoint (``.ckpt``)."""
        path = Path(path)
        if path.suffix == ".ckpt":
            module = RewardModel.load_from_checkpoint(str(path), map_location="cpu", strict=False)
            return cls(module.model, module.tokenizer, **kwargs).to(device)
        config_file = path / CONFIG_FILE
        if not config_file.exists():
            raise FileNotFoundError(
                f"{path} is not a reward-model folder (no {CONFIG_FILE}); pass the folder RewardModel exported at the "
                "end of training (`output_dir`, default <log dir>/hf_model) or a RewardModel .ckpt"
            )
        config = json.loads(config_file.read_text())
        backbone = load_model(str(path), dtype=config.get("dtype", "float32"), trainable_adapter=False)
        hidden = (backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone).config
        head = REWARD_HEADS[config["head"]](hidden.get_text_config().hidden_size)
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
        head = head.to(getattr(torch, config.get("head_dtype", "float32")))
        network = RewardNetwork(backbone, head).requires_grad_(False)
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

    @torch.no_grad()
    def score(self, prompts: list[list[dict]] | list[str], completions: list[str]) -> torch.Tensor:
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
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            scores.append(self.network(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)

    __call__ = score
