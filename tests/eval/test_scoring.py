"""Perplexity, choice log-likelihood and the batched generator against direct, unbatched computations."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.data.encoding import encode_conversation
from rlft.eval.accuracy import extract_answer, generative_accuracy, multiple_choice_accuracy
from rlft.eval.perplexity import perplexity
from rlft.eval.scoring import continuation_logprob, sliding_windows
from rlft.generation.generator import Generator, cut_at_stop
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.logprobs import IGNORE_INDEX

RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello!"},
            {"role": "assistant", "content": "Hi, how can I help you today?"},
            {"role": "user", "content": "Write a function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b): return a + b"},
        ]
    },
]


def _token_logps(model, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1, one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    return [logps[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_full_text_perplexity_is_token_weighted(tiny):
    model, tok = tiny
    total, count = 0.0, 0
    for record in RECORDS:
        ids = encode_conversation(tok, record["messages"]).input_ids
        logps = _token_logps(model, ids)
        total -= sum(logps)
        count += len(logps)
    result = perplexity(model, tok, RECORDS, mode="full", batch_size=2)
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)
    # token weighting differs from averaging per-example perplexities
    assert result.mean_example_perplexity != pytest.approx(result.perplexity, rel=1e-6)


def test_assistant_perplexity_scores_only_assistant_tokens(tiny):
    model, tok = tiny
    total, count = 0.0, 0
    for record in RECORDS:
        encoded = encode_conversation(tok, record["messages"])
        logps = _token_logps(model, encoded.input_ids)
        for t in range(1, len(encoded.input_ids)):
            if encoded.labels[t] != IGNORE_INDEX:
                total -= logps[t - 1]
                count += 1
    result = perplexity(model, tok, RECORDS, mode="assistant", batch_size=1)
    assert result.tokens == count < perplexity(model, tok, RECORDS, mode="full").tokens
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-4)


def test_sliding_windows_hand_layout():
    windows = sliding_windows(list(range(10)), [True] * 10, max_length=4, stride=2)
    layout = [(w.input_ids, [w.input_ids[p] for p in w.targets]) for w in windows]
    assert layout == [
        ([0, 1, 2], [1, 2]),
        ([1, 2, 3, 4], [3, 4]),
        ([3, 4, 5, 6], [5, 6]),
        ([5, 6, 7, 8], [7, 8]),
        ([6, 7, 8, 9], [9]),
    ]
    with pytest.raises(ValueError, match="stride"):
        sliding_windows([1, 2], [True, True], max_length=4, stride=4)


def test_sliding_window_perplexity_scores_every_token_once(tiny):
    model, tok = tiny
    long_text = {"text": " ".join(["The quick brown fox jumps over the lazy dog."] * 12)}
    n = len(tok(long_text["text"])["input_ids"])
    whole = perplexity(model, tok, [long_text], mode="full", max_length=n + 5)
    windowed = perplexity(model, tok, [long_text], mode="full", max_length=32, stride=16)
    assert whole.windows == 1 and windowed.windows > 1
    assert whole.tokens == windowed.tokens == n - 1
    # a window of 32 tokens loses little on a repeated sentence: same ballpark, not identical
    assert windowed.perplexity == pytest.approx(whole.perplexity, rel=0.2)
    assistant = perplexity(model, tok, [long_text], mode="assistant", max_length=32, stride=16)
    assert (assistant.perplexity, assistant.tokens) == (windowed.perplexity, windowed.tokens)  # SFT trains every token


def test_batching_does_not_change_scores(tiny):
    model, tok = tiny
    one = perplexity(model, tok, RECORDS, mode="full", batch_size=1)
    many = perplexity(model, tok, RECORDS, mode="full", batch_size=8)
    assert one.perplexity == pytest.approx(many.perplexity, rel=1e-5)


def test_choice_logprob_matches_direct_computation(tiny):
    model, tok = tiny
    context, choice = "Question: What do bees make?\nAnswer:", " honey"
    ids = tok(context + choice)["input_ids"]
    n_context = len(tok(context)["input_ids"])
    expected = sum(_token_logps(model, ids)[n_context - 1 :])
    ((score, count),) = continuation_logprob(model, tok, [(context, choice)])
    assert count == len(ids) - n_context
    assert score == pytest.approx(expected, abs=1e-4)


def test_multiple_choice_accuracy_follows_the_argmax(tiny):
    model, tok = tiny
    rows = [
        {"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Paint the jar blue."},
        {"goal": "How do you boil water?", "sol1": "Heat it in a pot.", "sol2": "Put it in the freezer."},
    ]
    probe = multiple_choice_accuracy(model, tok, [dict(r, label=0) for r in rows])
    best = [max(range(2), key=lambda j: p["logps"][j]) for p in probe["predictions"]]
    assert multiple_choice_accuracy(model, tok, [dict(r, label=b) for r, b in zip(rows, best)])["accuracy"] == 1.0
    assert multiple_choice_accuracy(model, tok, [dict(r, label=1 - b) for r, b in zip(rows, best)])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="PIQA fields"):
        multiple_choice_accuracy(model, tok, [{"question": "x"}])


def test_extractors():
    assert extract_answer("so 3 + 4 = 7, the answer is 1,234.", "last_number") == "1234"
    assert extract_answer("The answer is (B).", "choice_letter") == "B"
    assert extract_answer("  Paris.\nBecause...", "first_line") == "paris"
    assert extract_answer(r"thus \boxed{42}", "boxed") == "42"
    assert extract_answer("no digits here", "last_number") is None
    # names that are not registered are regexes (group 1 or the whole match), as in the exact_match reward
    assert extract_answer("Final: 17 apples", r"Final: (\d+)") == "17"
    with pytest.raises(ValueError, match="neither one of"):
        extract_answer("x", "(unclosed")


class _Scripted:
    """A generator that answers from a script (to test the accuracy bookkeeping alone)."""

    def __init__(self, answers):
        self.answers = answers

    def generate(self, prompts, settings=None):
        return [[self.answers[p[0]["content"]]] for p in prompts]


def test_generative_accuracy_bookkeeping():
    items = [
        {"question": "2+2?", "answer": "4"},
        {"question": "3*3?", "answer": "9"},
        {"question": "1+0?", "answer": "1"},
    ]
    scripted = _Scripted({"2+2?": "It is 4.", "3*3?": "I think 6", "1+0?": "no idea"})
    result = generative_accuracy(scripted, items, extractor="last_number")
    assert result["accuracy"] == pytest.approx(1 / 3) and result["no_answer"] == 1 and result["n"] == 3


def test_batched_generation_equals_one_by_one(tiny):
    model, tok = tiny
    gen = Generator(model, tok, DecoderSettings(backend="hf"))
    prompts = ["The capital of France", [{"role": "user", "content": "hello!"}], "def add(a, b):"]
    settings = SamplingSettings(max_new_tokens=12)
    batched = gen.generate(prompts, settings, batch_size=3)
    single = [gen.generate([p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single
    rng_before = torch.get_rng_state()
    sampled = gen.generate(prompts[:1], SamplingSettings(max_new_tokens=8, temperature=1.0, num_samples=4))
    assert len(sampled) == 1 and len(sampled[0]) == 4
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's RNG stream is untouched
    again = gen.generate(prompts[:1], SamplingSettings(max_new_tokens=8, temperature=1.0, num_samples=4))
    assert again == sampled  # seeded: reproducible
    assert cut_at_stop("a\ndef f", ["\ndef", "\nclass"]) == "a"
    assert model.training is False
