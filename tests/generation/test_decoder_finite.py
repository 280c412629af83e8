"""Diverged weights (huge but finite, so the training guard's finiteness checks stay quiet) give NaN/inf logits; the
decoder must say so in one actionable line instead of drawing an index past the vocabulary (a bare IndexError)."""

from __future__ import annotations

import pytest
import torch

from rlft.cli import _user_error_types
from rlft.generation.decoder import NonFiniteLogitsError, decode, sample_tokens
from rlft.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.8),
]


def _bad_rows(kind: str) -> torch.Tensor:
    logits = torch.randn(4, 50)
    if kind == "nan":
        logits[1, 7] = float("nan")
    elif kind == "posinf":
        logits[2, 3] = float("inf")
    else:  # nothing left to draw from
        logits[3] = float("-inf")
    return logits


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("kind", ["nan", "posinf", "all_neginf"])
def test_non_finite_logits_raise_a_user_facing_error_in_every_sampling_mode(kind, settings):
    with pytest.raises(NonFiniteLogitsError, match=r"non-finite logits while sampling .*lower the learning rate"):
        sample_tokens(_bad_rows(kind), **settings)


@pytest.mark.parametrize("settings", SETTINGS)
def test_masked_vocabulary_entries_are_not_mistaken_for_divergence(settings):
    logits = torch.randn(4, 50)
    logits[:, 40:] = float("-inf")  # e.g. padding entries of the vocabulary a model masks out
    tokens = sample_tokens(logits, **settings)
    assert (tokens < 40).all()


def test_the_error_is_one_the_cli_reports_as_one_line():
    assert issubclass(NonFiniteLogitsError, ValueError) and issubclass(NonFiniteLogitsError, FloatingPointError)
    assert issubclass(NonFiniteLogitsError, _user_error_types())


@pytest.fixture(scope="module")
def diverged():
    """tiny-llama after a learning rate of 1e30: its projections ~1e30, every weight finite. (Scaling the norms and
    embeddings too gives zero logits instead: RMSNorm's x**2 overflows and its rsqrt is 0.)"""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "proj" in name or "lm_head" in name:
                param.copy_(torch.randn_like(param) * 1e30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model, tokenizer


@pytest.mark.parametrize("max_new_tokens", [1, 6])  # the last step has its own check
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("lean", [True, False])
def test_decoding_with_diverged_weights_raises_before_any_token_is_handed_out(
    diverged, max_new_tokens, temperature, lean
):
    model, tokenizer = diverged
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    seen = []
    with pytest.raises(NonFiniteLogitsError, match="the weights diverged"):
        decode(
            model,
            ids,
            torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            stop_ids=[tokenizer.eos_token_id],
            pad_id=0,
            group_size=2,
            temperature=temperature,
            lean=lean,
            on_step=lambda column: seen.append(column.tolist()),
        )
    vocabulary = model.config.vocab_size
    assert all(token < vocabulary for column in seen for token in column)  # the marker never escapes


def test_healthy_decoding_is_unchanged(diverged):
    model = load_model("tiny-llama").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.manual_seed(3)
    out = decode(model, ids, torch.ones_like(ids), max_new_tokens=8, stop_ids=[], pad_id=0, group_size=3)
    assert out.shape == (3, 8) and (out < model.config.vocab_size).all()
