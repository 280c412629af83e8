"""Chat-template encoding: assistant-only labels are token-exact, BOS is never doubled, truncation keeps the end."""

from __future__ import annotations

import pytest

from rlft.data.encoding import (
    IGNORE_INDEX,
    conversation_segments,
    encode_conversation,
    encode_pair,
    encode_prompt,
    encode_sft,
)
from rlft.models import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "3 + 3 = 6."},
]
# family -> end-of-turn marker its template closes assistant turns with
TEMPLATES = {"tiny-llama": "<|eot_id|>", "tiny-gemma": "<end_of_turn>", "tiny-qwen2": "<|im_end|>"}


def _trained_runs(encoded) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _check_exact_labels(tokenizer, eot: str) -> None:
    encoded = encode_conversation(tokenizer, CONVERSATION)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    # the ids are the template's own rendering, token for token
    assert encoded.input_ids == tokenizer(full, add_special_tokens=False)["input_ids"]
    runs = _trained_runs(encoded)
    expected = [m["content"] + eot for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(r) for r in runs] == expected
    for run, text in zip(runs, expected):  # exactly the content tokens and the end-of-turn token, nothing else
        assert run == tokenizer(text, add_special_tokens=False)["input_ids"]
    untrained = tokenizer.decode([t for t, lab in zip(encoded.input_ids, encoded.labels) if lab == IGNORE_INDEX])
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in untrained  # prompts never leak into the loss


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_labels_are_exactly_content_and_end_of_turn(name):
    _check_exact_labels(load_tokenizer(name), TEMPLATES[name])


@pytest.mark.real
def test_assistant_labels_on_smollm2_template(smollm2):
    tokenizer = load_tokenizer(smollm2)
    _check_exact_labels(tokenizer, "<|im_end|>")
    # SmolLM2's template injects a default system prompt; it must stay out of the labels too
    encoded = encode_conversation(tokenizer, CONVERSATION[1:])
    assert "SmolLM" not in "".join(tokenizer.decode(r) for r in _trained_runs(encoded))


def test_only_last_turn_trained_when_asked():
    tokenizer = load_tokenizer("tiny-qwen2")
    runs = _trained_runs(encode_conversation(tokenizer, CONVERSATION, train_on="last"))
    assert [tokenizer.decode(r) for r in runs] == ["3 + 3 = 6.<|im_end|>"]


def test_no_double_bos_when_tokenizer_and_template_both_add_it():
    tokenizer = load_tokenizer("tiny-llama")  # its tokenizer adds BOS *and* its template starts with bos_token
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    encoded = encode_conversation(tokenizer, CONVERSATION)
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1
    pair = encode_pair(tokenizer, CONVERSATION[:2], "4", "5", max_length=512)
    assert pair["prompt_ids"].count(tokenizer.bos_token_id) == 1
    assert encode_prompt(tokenizer, CONVERSATION[:2]).input_ids.count(tokenizer.bos_token_id) == 1


def test_segments_concatenate_to_the_full_render():
    tokenizer = load_tokenizer("tiny-gemma")
    segments = conversation_segments(tokenizer, CONVERSATION)
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)


def test_sft_truncation_keeps_end_of_prompt_and_the_reply():
    tokenizer = load_tokenizer("tiny-qwen2")
    long_question = "word " * 300 + "FINAL QUESTION?"
    messages = [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Short answer."}]
    encoded = encode_sft(tokenizer, messages, max_length=64)
    assert encoded.truncated and len(encoded.input_ids) == 64
    text = tokenizer.decode(encoded.input_ids)
    assert "FINAL QUESTION?" in text and text.endswith("Short answer.<|im_end|>\n")
    assert tokenizer.decode(_trained_runs(encoded)[0]) == "Short answer.<|im_end|>"


def test_pair_truncation_cuts_prompt_start_then_reply_ends():
    tokenizer = load_tokenizer("tiny-qwen2")
    prompt = [{"role": "user", "content": "x " * 200 + "END"}]
    pair = encode_pair(tokenizer, prompt, "good " * 100, "bad", max_length=80)
    assert pair["truncated"]
    assert len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= 80
    assert "END" in tokenizer.decode(pair["prompt_ids"])
    assert len(pair["prompt_ids"]) >= 40  # the prompt keeps at least half the budget
    short = encode_pair(tokenizer, [{"role": "user", "content": "hi"}], "a", "b", max_length=80)
    assert not short["truncated"]
    assert tokenizer.decode([t for t in short["chosen_labels"] if t != IGNORE_INDEX]) == "a<|im_end|>"


def test_prompt_left_truncation():
    tokenizer = load_tokenizer("tiny-qwen2")
    encoded = encode_prompt(tokenizer, [{"role": "user", "content": "y " * 100 + "TAIL"}], max_length=20)
    assert encoded.truncated and len(encoded.input_ids) == 20
    assert tokenizer.decode(encoded.input_ids).endswith("TAIL<|im_end|>\n<|im_start|>assistant\n")
