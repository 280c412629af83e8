"""The training forward of a rollout laid out like DPO's shared prompts: one prompt, all of its completions.

A GRPO rollout holds ``group_size`` completions of each prompt, and the padded layout runs every row as
``[left-padded prompt, right-padded response]``: the prompt's layers run ``group_size`` times, plus every pad
token. :func:`group_layout` packs each prompt once, followed by its completions without padding, into one span
per prompt: ``[p, r1, ..., rG]`` with positions ``[0..|p|)``, then ``[|p|..|p|+|ri|)`` for each ``ri``, and a mask in
which each ``ri`` attends to ``p`` and to itself only. Every response token gets exactly the hidden state it has in
its own ``[p, ri]`` sequence (the same log-probs up to float rounding), while the work shrinks from
``G * (P_max + R_max)`` to ``|p| + sum |ri|`` tokens per prompt. The span is a
:func:`rlft.models.prompt_tree.prompt_tree`, the layout DPO's shared prompts use too.

Rows are grouped by their prompt tokens, so a shuffled minibatch (rows of a prompt anywhere) is laid out the same
way; a prompt alone in the minibatch is simply a span of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlft.models.attention import segmented_inputs
from rlft.models.prompt_tree import prompt_tree


@dataclass
class GroupLayout:
    """Model inputs for the packed row, and where each scored response token is read.

    ``source[k]`` is the position in the packed row whose hidden state predicts ``targets[k]``, the token at
    ``(rows[k], cols[k])`` of the ``[N, R]`` response tensor.
    """

    inputs: dict
    source: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def _group_rows(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Row indices sharing one prompt (the same real tokens), in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
        key = tuple(token for token, keep in zip(ids, mask) if keep)
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def group_layout(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> GroupLayout:
    """The packed, prompt-sharing layout of ``[N, P]`` left-padded prompts and ``[N, R]`` right-padded responses."""
    lengths = response_mask.sum(-1).tolist()
    ids, positions, segments, source, rows, cols = [], [], [], [], [], []
    offset = 0
    for group in _group_rows(prompt_ids, prompt_mask):
        prompt = prompt_ids[group[0]][prompt_mask[group[0]].bool()]
        tree = prompt_tree(prompt, [response_ids[row, : lengths[row]] for row in group])
        ids.append(tree.ids)
        positions.append(tree.positions)
        segments.append(tree.segment(offset))
        for branch, row in enumerate(group):
            size = tree.lengths[branch]
            # token t of the response is predicted at the token before it in its own [p, r] sequence: the prompt's
            # last token (t = 0), else response token t - 1
            source.append(offset + tree.sequence(branch)[tree.prompt_length - 1 : tree.prompt_length - 1 + size])
            rows.append(torch.full((size,), row, device=prompt_ids.device))
            cols.append(torch.arange(size, device=prompt_ids.device))
        offset += len(tree)
    inputs = segmented_inputs(torch.cat(ids), torch.cat(positions), tuple(segments))
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    return GroupLayout(inputs, torch.cat(source), response_ids[rows_t, cols_t], rows_t, cols_t)
