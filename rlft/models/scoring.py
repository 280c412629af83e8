"""Scoring preference pairs: per-sequence log-probs of chosen and rejected responses in one forward.

Shared by DPO, ORPO, SimPO and the reward model. A :class:`rlft.data.batches.PairBatch` holds its ``2B`` sequences
(chosen first) padded to one width or packed (one padding-free row of ``[chosen_1..chosen_B, rejected_1..rejected_B]``
with restarting ``position_ids``, see :func:`rlft.data.padding.pack`); with ``share_prompts`` either becomes one row
of prompt trees (:func:`shared_prompt_layout`). All layouts give the same numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from rlft.data.batches import PairBatch, Tokens
from rlft.logprobs import IGNORE_INDEX, gather_logps, hidden_logps
from rlft.models.attention import forward_inputs, segmented_attention, segmented_inputs
from rlft.models.prompt_tree import prompt_tree
from rlft.models.unwrap import causal_lm


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


def vocabulary_size(lm: torch.nn.Module) -> int:
    """Rows of the output head; a ZeRO-3 partition's own shape is ``[0]``, its full one ``ds_shape``."""
    weight = lm.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


def plain_head(lm: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head when logits are exactly ``hidden @ W.T (+ b)``; None when the model rescales or caps them."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    config = getattr(lm, "config", None)
    rescaled = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
    )
    # a LoRA-wrapped head is not an nn.Linear, and its update would be missed by reading `.weight`
    return head if type(head) is torch.nn.Linear and not rescaled else None


def scored_logps(model: torch.nn.Module, inputs: dict, source: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-prob of ``targets[k]`` as predicted at position ``source[k]`` of the flattened ``[rows * T]`` outputs.

    The LM head runs only at the ``source`` positions, chunk by chunk (:func:`rlft.logprobs.hidden_logps`), so no
    ``[rows, T, V]`` logits exist; models whose logits are rescaled or capped fall back to the full forward.
    """
    lm = causal_lm(model)
    head = plain_head(lm)
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        return gather_logps(logits.flatten(0, 1)[source], targets)
    hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
    return hidden_logps(hidden.flatten(0, 1)[source], head.weight, targets, bias=head.bias)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row, for left, right or no padding (``[B]``)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2 ... counted over real tokens only, so a left-padded row gets the positions of its unpadded self."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def flat_last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended token in the flattened ``[B * T]`` positions (``[B]``)."""
    rows = torch.arange(len(attention_mask), device=attention_mask.device)
    return last_token_index(attention_mask) + rows * attention_mask.shape[1]


@dataclass
class PairLayout:
    """How a batch of pairs is fed to the model and where each scored token's log-prob is read.

    ``source[k]`` is the position, in the flattened ``[rows * T]`` hidden states, whose prediction scores token
    ``targets[k]`` of sequence ``owner[k]`` (chosen ``0..B-1``, rejected ``B..2B-1``); ``last[i]`` is the position
    of sequence ``i``'s last token (where a reward model reads its score).
    """

    inputs: dict
    source: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    sequences: int
    last: torch.Tensor


def _padded_layout(tokens: Tokens) -> PairLayout:
    mask, labels = tokens.attention_mask, tokens.labels
    # positions counted over real tokens: left- and right-padded rows score alike
    inputs = {"input_ids": tokens.input_ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    width = labels.shape[1]
    return PairLayout(inputs, rows * width + cols, labels[rows, cols + 1], rows, len(labels), flat_last_positions(mask))


def _packed_layout(model: torch.nn.Module, tokens: Tokens) -> PairLayout:
    """One padding-free row with restarting ``position_ids`` (attended per example where the model allows)."""
    lengths = tokens.seq_lengths
    inputs = forward_inputs(model, tokens)
    labels = tokens.labels[0]
    cols = (labels[1:] != IGNORE_INDEX).nonzero()[:, 0]
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    return PairLayout(inputs, cols, labels[cols + 1], owner[cols + 1], len(lengths), lengths.cumsum(0) - 1)


def _pair_sequences(batch: PairBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, labels)`` of every sequence, chosen ``1..B`` then rejected ``1..B``, without padding."""
    return batch.sequences.sequences()


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if len(differ) else n


def shared_prompt_layout(batch: PairBatch) -> PairLayout:
    """Each pair as one tree: the common prefix (the prompt) once, then both responses, each attending to it.

    A pair ``(p + c, p + r)`` becomes the span ``[p, c, r]`` with positions ``[0..|p|), [|p|..), [|p|..)`` and a
    mask in which ``c`` and ``r`` see ``p`` and themselves but not each other, so every token gets exactly the hidden
    state it has in its own sequence, while the prompt's layers run once instead of twice. The chosen and rejected
    prompts are compared token by token; pairs whose sequences start differently (e.g. truncated differently) are
    laid out as two ordinary causal spans.
    """
    sequences = _pair_sequences(batch)  # 2n unpadded (ids [L_k], labels [L_k]): chosen 0..n-1, rejected n..2n-1
    n = len(sequences) // 2
    device = sequences[0][0].device
    # maps[k]: [L_k] index of each token of sequence k in the one flat row (shared prompt tokens map twice)
    ids, positions, segments, maps = [], [], [], [None] * (2 * n)
    offset = 0
    for i in range(n):
        (chosen, _), (rejected, _) = sequences[i], sequences[n + i]
        shared = _common_prefix(chosen, rejected)
        lc, lr = len(chosen), len(rejected)
        if shared == 0:
            ids += [chosen, rejected]
            positions += [torch.arange(lc, device=device), torch.arange(lr, device=device)]
            segments += [(offset, offset + lc, None), (offset + lc, offset + lc + lr, None)]
            maps[i] = torch.arange(offset, offset + lc, device=device)
            maps[n + i] = torch.arange(offset + lc, offset + lc + lr, device=device)
            offset += lc + lr
            continue
        # the span [p, c, r]: c and r continue p's positions and see p and themselves only
        tree = prompt_tree(chosen[:shared], [chosen[shared:], rejected[shared:]])
        ids.append(tree.ids)
        positions.append(tree.positions)
        segments.append(tree.segment(offset))
        maps[i], maps[n + i] = offset + tree.sequence(0), offset + tree.sequence(1)
        offset += len(tree)
    source, targets, owner = [], [], []  # per scored token: flat row index predicting it, its id, its sequence
    for k, (_, labels) in enumerate(sequences):
        t = (labels[1:] != IGNORE_INDEX).nonzero()[:, 0] + 1  # [K_k] positions in sequence k that are scored
        source.append(maps[k][t - 1])
        targets.append(labels[t])
        owner.append(torch.full_like(t, k))
    inputs = segmented_inputs(torch.cat(ids), torch.cat(positions), tuple(segments))
    last = torch.stack([m[-1] for m in maps])  # [2n] flat index of each sequence's last token
    return PairLayout(inputs, torch.cat(source), torch.cat(targets), torch.cat(owner), 2 * n, last)


def pair_layout(model: torch.nn.Module, batch: PairBatch, share_prompts: bool = False) -> PairLayout:
    """The shared-prompt layout when asked for and the model supports it, else the batch's packed or padded one."""
    if share_prompts and segmented_attention(model):
        return shared_prompt_layout(batch)
    if batch.sequences.packed:
        return _packed_layout(model, batch.sequences)
    return _padded_layout(batch.sequences)


def pair_logps(model: torch.nn.Module, batch: PairBatch, share_prompts: bool = False) -> PairLogps:
    """Log-probs of chosen and rejected responses from one forward over ``[chosen; rejected]``.

    The LM head is applied only to scored positions (never to the prompt), chunk by chunk, so the ``[2B, T, V]``
    logits are not materialised; models with rescaled logits fall back to the full forward. With ``share_prompts``
    (and a model that takes segmented attention, see :mod:`rlft.models.attention`), each pair's prompt is run once for
    both responses (:func:`shared_prompt_layout`); the numbers are those of the plain layout.
    """
    layout = pair_layout(model, batch, share_prompts)
    token_logps = scored_logps(model, layout.inputs, layout.source, layout.targets)
    rows = layout.owner
    sequences = layout.sequences
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


def batch_keys(batch: PairBatch) -> list[str]:
    """The :func:`pair_key` of every pair of a padded or packed batch."""
    sequences = [ids.tolist() for ids, _ in batch.sequences.sequences()]
    n = len(batch)
    return [pair_key(sequences[i], sequences[n + i], p) for i, p in enumerate(batch.prompt_lengths.tolist())]


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
