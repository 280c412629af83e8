"""One prompt and several continuations of it packed as a tree: the prompt once, then every branch.

DPO's shared prompts (a chosen and a rejected response, :func:`rlft.models.scoring.shared_prompt_layout`) and GRPO's
groups (``G`` completions, :func:`rlft.rl.layout.group_layout`) both lay a prompt ``p`` and branches ``b_1 .. b_K``
out as the one span ``[p, b_1, ..., b_K]``: positions ``[0..|p|)`` for the prompt, ``[|p|..|p|+|b_k|)`` for each
branch (continuing the prompt's), and a mask in which every branch token attends to the prompt and to the earlier
tokens of its own branch only. Every token then gets exactly the hidden state it has in its own sequence
``p + b_k``, while the prompt's layers run once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlft.models.attention import Segment


@dataclass
class PromptTree:
    """A prompt and its branches packed into one span.

    Attributes:
        ids: ``[S]`` token ids: the prompt, then each branch in order (``S = |p| + sum |b_k|``).
        positions: ``[S]`` position ids: ``0..|p|-1``, then ``|p|..|p|+|b_k|-1`` for each branch.
        mask: ``[S, S]`` boolean, ``mask[q, k]``: token ``q`` attends to token ``k`` (causal within ``p + b``).
        prompt_length: ``|p|``.
        starts: Index in the span of each branch's first token.
        lengths: ``|b_k|`` of each branch.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    prompt_length: int
    starts: list[int]
    lengths: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    def sequence(self, branch: int) -> torch.Tensor:
        """``[|p| + |b|]`` span indices of the tokens of the whole sequence ``p + b`` of ``branch``, in order."""
        device = self.ids.device
        start = self.starts[branch]
        own = torch.arange(start, start + self.lengths[branch], device=device)
        return torch.cat([torch.arange(self.prompt_length, device=device), own])

    def segment(self, offset: int) -> Segment:
        """The attention segment of the span placed at ``offset`` of a packed row."""
        return (offset, offset + len(self), self.mask[None, None])


def prompt_tree(prompt: torch.Tensor, branches: Sequence[torch.Tensor]) -> PromptTree:
    """Pack the ``[P]`` token ids ``prompt`` and the 1-D ``branches`` (any lengths, 0 included) as one tree span."""
    device = prompt.device
    prompt_length = len(prompt)
    lengths = [len(b) for b in branches]
    starts, start = [], prompt_length
    for n in lengths:
        starts.append(start)
        start += n
    # part [S]: 0 = prompt, k + 1 = branch k; positions [S]: each branch continues the prompt's
    part = torch.repeat_interleave(
        torch.arange(len(branches) + 1, device=device), torch.tensor([prompt_length, *lengths], device=device)
    )
    positions = torch.cat(
        [torch.arange(prompt_length, device=device)]
        + [torch.arange(prompt_length, prompt_length + n, device=device) for n in lengths]
    )
    # causal by position, and a token sees the prompt (part 0) and its own part only
    mask = (positions[None, :] <= positions[:, None]) & ((part[None, :] == 0) | (part[None, :] == part[:, None]))
    ids = torch.cat([prompt, *branches])
    return PromptTree(ids, positions, mask, prompt_length, starts, lengths)
