"""Scoring preference pairs: per-sequence log-probs of chosen and rejected responses in one forward.

Shared by DPO, ORPO and SimPO. Batches come padded (``chosen_*``/``rejected_*`` tensors of one width) or packed
(one padding-free row of ``[chosen_1..chosen_B, rejected_1..rejected_B]`` with restarting ``position_ids``, see
:func:`rlft.data.collate.pack`); both give the same numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from rlft.ops import IGNORE_INDEX, gather_logps, hidden_logps


@dataclass
class PairLogps:
    """Per-sequence log-probs of a batch of pairs, summed over the response tokens, and the token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_avg(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Mean token NLL of each chosen response (the SFT loss term of RPO, ORPO, CPO)."""
        return -self.chosen_avg


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(lm: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head when logits are exactly ``hidden @ W.T (+ b)``; None when the model rescales or caps them."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    rescaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
    )
    # a LoRA-wrapped head is not an nn.Linear, and its update would be missed by reading `.weight`
    return head if type(head) is torch.nn.Linear and not rescaled else None


def _flatten(batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor, int]:
    """Model inputs, shifted labels ``[R, T-1]``, each label position's sequence index, and the sequence count."""
    if "seq_lengths" in batch:  # packed: one row, sequences told apart by restarting position_ids
        lengths = batch["seq_lengths"]
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)[None, 1:]
        return inputs, batch["labels"][:, 1:], owner, len(lengths)
    inputs = {
        "input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        "attention_mask": torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]),
    }
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    owner = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)
    return inputs, labels, owner, len(labels)


def pair_logps(model: torch.nn.Module, batch: dict) -> PairLogps:
    """Log-probs of chosen and rejected responses from one forward over ``[chosen; rejected]``.

    The LM head is applied only to scored positions (never to the prompt), chunk by chunk, so the ``[2B, T, V]``
    logits are not materialised; models with rescaled logits fall back to the full forward.
    """
    inputs, labels, owner, sequences = _flatten(batch)
    scored = labels != IGNORE_INDEX
    lm = _causal_lm(model)
    head = _plain_head(lm)
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        token_logps = gather_logps(logits[:, :-1], labels)[scored]
    else:
        hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
        token_logps = hidden_logps(hidden[:, :-1][scored], head.weight, labels[scored], bias=head.bias)
    rows = owner[scored]
    sums = torch.zeros(sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(sequences, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    n = sequences // 2
    return PairLogps(sums[:n], sums[n:], counts[:n], counts[n:])


def pair_key(chosen_ids, rejected_ids, prompt_length: int) -> str:
    """Stable key of one pair: a hash of its two token sequences and where the prompt ends."""
    digest = hashlib.blake2b(digest_size=16)
    for ids in (chosen_ids, rejected_ids, [prompt_length]):
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def batch_keys(batch: dict) -> list[str]:
    """The :func:`pair_key` of every pair of a padded or packed batch."""
    prompt_lengths = batch["prompt_lengths"].tolist()
    if "seq_lengths" in batch:
        sequences = batch["input_ids"][0].split(batch["seq_lengths"].tolist())
        n = len(prompt_lengths)
        return [pair_key(sequences[i].tolist(), sequences[n + i].tolist(), p) for i, p in enumerate(prompt_lengths)]
    keys = []
    for i, prompt_length in enumerate(prompt_lengths):
        chosen = batch["chosen_input_ids"][i][batch["chosen_attention_mask"][i].bool()].tolist()
        rejected = batch["rejected_input_ids"][i][batch["rejected_attention_mask"][i].bool()].tolist()
        keys.append(pair_key(chosen, rejected, prompt_length))
    return keys


def zero_dropout(module: torch.nn.Module) -> None:
    """Zero every dropout so the policy and its reference see the same deterministic network (as TRL does)."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.p = 0.0


def pair_metrics(logps: PairLogps, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """The shared preference metrics (names without the ``train/``/``val/`` prefix)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps.chosen.detach().mean(),
        "logps/rejected": logps.rejected.detach().mean(),
    }
