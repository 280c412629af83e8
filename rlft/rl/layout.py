"""The training forward of a rollout laid out like DPO's shared prompts: one prompt, all of its completions.

A GRPO rollout holds ``group_size`` completions of each prompt, and the padded layout runs every row as
``[left-padded prompt, right-padded response]``: the prompt's layers run ``group_size`` times, plus every pad
token. :func:`group_layout` packs each prompt once, followed by its completions without padding, into one span
per prompt: ``[p, r1, ..., rG]`` with positions ``[0..|p|)``, then ``[|p|..|p|+|ri|)`` for each ``ri``, and a mask in
which each ``ri`` attends to ``p`` and to itself only. Every response token gets exactly the hidden state it has in
its own ``[p, ri]`` sequence (the same log-probs up to float rounding), while the work shrinks from
``G * (P_max + R_max)`` to ``|p| + sum |ri|`` tokens per prompt.

Rows are grouped by their prompt tokens, so a shuffled minibatch (rows of a prompt anywhere) is laid out the same
way; a prompt alone in the minibatch is simply a span of one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlft.models.attention import Segment, segmented_inputs


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
    device = prompt_ids.device
    lengths = response_mask.sum(-1).tolist()
    ids, positions, segments, source, rows, cols = [], [], [], [], [], []
    offset = 0
    for group in _group_rows(prompt_ids, prompt_mask):
        prompt = prompt_ids[group[0]][prompt_mask[group[0]].bool()]
        spans = [prompt] + [response_ids[row, : lengths[row]] for row in group]
        sizes = [len(s) for s in spans]
        part = torch.repeat_interleave(torch.arange(len(spans), device=device), torch.tensor(sizes, device=device))
        order = torch.arange(len(part), device=device)
        # causal in packing order, and a response sees only the prompt (part 0) and its own tokens
        mask = (order[None, :] <= order[:, None]) & ((part[None, :] == 0) | (part[None, :] == part[:, None]))
        segment: Segment = (offset, offset + len(part), mask[None, None])
        segments.append(segment)
        ids.extend(spans)
        positions.append(torch.arange(len(prompt), device=device))
        prompt_last = offset + len(prompt) - 1
        start = prompt_last + 1
        for row, size in zip(group, sizes[1:]):
            positions.append(torch.arange(len(prompt), len(prompt) + size, device=device))
            # token t of the response is predicted at the prompt's last token (t = 0), else at token t - 1
            source.append(
                torch.cat(
                    [torch.tensor([prompt_last], device=device), torch.arange(start, start + size - 1, device=device)]
                )
            )
            rows.append(torch.full((size,), row, device=device))
            cols.append(torch.arange(size, device=device))
            start += size
        offset += len(part)
    inputs = segmented_inputs(torch.cat(ids), torch.cat(positions), tuple(segments))
    rows_t, cols_t = torch.cat(rows), torch.cat(cols)
    return GroupLayout(inputs, torch.cat(source), response_ids[rows_t, cols_t], rows_t, cols_t)
