"""The prompt-tree span shared by DPO's shared prompts and GRPO's groups, checked by hand."""

from __future__ import annotations

import torch

from rlft.models.prompt_tree import prompt_tree


def test_three_token_prompt_with_branches_of_two_and_one():
    prompt = torch.tensor([10, 11, 12])
    tree = prompt_tree(prompt, [torch.tensor([20, 21]), torch.tensor([30])])
    assert tree.ids.tolist() == [10, 11, 12, 20, 21, 30]
    # both branches continue the prompt's positions
    assert tree.positions.tolist() == [0, 1, 2, 3, 4, 3]
    expected = [
        [1, 0, 0, 0, 0, 0],  # prompt: causal among itself
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # branch 0: the prompt and its own earlier tokens
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # branch 1: the prompt and itself, not branch 0
    ]
    assert tree.mask.dtype == torch.bool and tree.mask.int().tolist() == expected
    assert tree.prompt_length == 3 and tree.starts == [3, 5] and tree.lengths == [2, 1] and len(tree) == 6
    assert tree.sequence(0).tolist() == [0, 1, 2, 3, 4]
    assert tree.sequence(1).tolist() == [0, 1, 2, 5]
    assert tree.ids[tree.sequence(1)].tolist() == [10, 11, 12, 30]  # the sequence p + b, read back from the span
    start, end, mask = tree.segment(7)
    assert (start, end) == (7, 13) and mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], tree.mask)


def test_an_empty_branch_is_the_prompt_alone():
    tree = prompt_tree(torch.tensor([1, 2]), [torch.tensor([], dtype=torch.long), torch.tensor([3])])
    assert tree.ids.tolist() == [1, 2, 3] and tree.positions.tolist() == [0, 1, 2]
    assert tree.sequence(0).tolist() == [0, 1] and tree.sequence(1).tolist() == [0, 1, 2]
    assert tree.mask.int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
