"""Token ids that every generator and scorer must agree on: where a response stops, what pads it."""

from __future__ import annotations

from collections.abc import Sequence

# turn-ending tokens of common chat templates: not always the tokenizer's EOS
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>", "<|end|>", "</s>")


def stop_token_ids(tokenizer, model=None, extra: Sequence[int] = ()) -> list[int]:
    """Token ids that end a response: EOS of the tokenizer and generation config, chat end-of-turn tokens, extras.

    Training rollouts, evaluation generation and serving all call this, so a reply ends at the same token
    everywhere.
    """
    ids = set(extra)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
