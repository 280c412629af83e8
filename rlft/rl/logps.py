"""Teacher-forced per-token log-probs of rollouts: the scoring forward that the update and the rollout share.

Only the response positions reach the LM head; with ``share_prompts`` rows of one prompt run as one packed span,
the prompt once (:func:`rlft.rl.layout.group_layout`). The same position ids as the training forward, so the first
PPO/GRPO update sees an importance ratio of exactly 1.
"""

from __future__ import annotations

import torch

from rlft.logprobs import entropy_from_logits, gather_logps, hidden_logps, hidden_logps_and_entropy
from rlft.models.attention import segmented_attention
from rlft.models.scoring import plain_head, position_ids_from_mask
from rlft.models.unwrap import causal_lm
from rlft.rl.layout import group_layout


def token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_hidden: bool = False,
    share_prompts: bool = False,
    with_logps: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-token log-probs of the last ``response_length`` tokens (differentiable when grad is on).

    Only the logits of the response positions are computed (``logits_to_keep``), which avoids a ``[N, L, V]``
    tensor over the prompt. With ``share_prompts`` (and a model that takes segmented attention), rows with the same
    prompt are run as one packed span, the prompt once (:func:`rlft.rl.layout.group_layout`); outputs at padding
    positions are then 0.

    Args:
        model: Causal LM.
        input_ids: ``[N, P + R]`` prompt (left padded) followed by response (right padded).
        attention_mask: Same shape.
        response_length: ``R``.
        temperature: Sampling temperature the logits are divided by (0 counts as 1: greedy has no temperature).
        with_entropy: Also return the per-token entropy (detached) of the sampling distribution.
        with_hidden: Also return the last hidden state at the positions predicting each response token.
        share_prompts: Run each prompt once for all of its rows.
        with_logps: ``False`` returns ``(None, None, hidden)`` without running the LM head (a critic's trunk: its
            vocabulary logits would be computed for nothing).

    Returns:
        ``(logps [N, R], entropy [N, R] or None, hidden [N, R, H] or None)``.
    """
    lm = causal_lm(model)
    head = plain_head(lm)
    temperature = temperature if temperature > 0 else 1.0
    if share_prompts and head is not None and segmented_attention(model):
        return _shared_prompt_logps(
            lm, head, input_ids, attention_mask, response_length, temperature, with_entropy, with_hidden, with_logps
        )
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    if head is not None:
        # decoder stack, then the head on the response positions only: the same calls pair scoring makes, which a
        # sharded (FSDP2) network serves without the full model's forward
        hidden = lm.base_model(**inputs).last_hidden_state[:, -response_length - 1 : -1]
        if not with_logps:
            return None, None, hidden
        logps, entropy = _head_logps(head, hidden, input_ids[:, -response_length:], temperature, with_entropy)
        return logps, entropy, hidden if with_hidden else None
    # rescaled or capped logits: the model's own forward
    out = model(**inputs, logits_to_keep=response_length + 1, output_hidden_states=with_hidden)
    logits = out.logits[:, -response_length - 1 : -1]
    hidden = out.hidden_states[-1][:, -response_length - 1 : -1] if with_hidden else None
    if not with_logps:
        return None, None, hidden
    logps = gather_logps(logits, input_ids[:, -response_length:], temperature=temperature)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits.detach(), temperature=temperature)
    return logps, entropy, hidden if with_hidden else None


def _shared_prompt_logps(
    lm, head, input_ids, attention_mask, response_length, temperature, with_entropy, with_hidden, with_logps
):
    split = input_ids.shape[1] - response_length
    layout = group_layout(
        input_ids[:, :split], attention_mask[:, :split], input_ids[:, split:], attention_mask[:, split:]
    )
    hidden = lm.base_model(**layout.inputs, use_cache=False).last_hidden_state[0, layout.source]
    index = (layout.rows, layout.cols)
    shape = (input_ids.shape[0], response_length)

    def scatter(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros((*shape, *values.shape[1:])).index_put(index, values)

    if not with_logps:
        return None, None, scatter(hidden)
    logps, entropy = _head_logps(head, hidden, layout.targets, temperature, with_entropy)
    return scatter(logps), None if entropy is None else scatter(entropy), scatter(hidden) if with_hidden else None


def _head_logps(head, hidden, targets, temperature, with_entropy):
    """The LM head over ``hidden`` chunk by chunk (:func:`rlft.logprobs.hidden_logps`): the ``[tokens, V]`` logits and
    their gradient never exist at once (0.15 GB each in bf16 for a 16 x 48-token rollout of a 49k vocabulary,
    0.8 GB for Gemma's 262k)."""
    if with_entropy:
        return hidden_logps_and_entropy(hidden, head.weight, targets, bias=head.bias, temperature=temperature)
    return hidden_logps(hidden, head.weight, targets, bias=head.bias, temperature=temperature), None
