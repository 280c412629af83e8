"""The two settings types every sampler shares: what is sampled (SamplingSettings) and how (DecoderSettings)."""

from __future__ import annotations

import pytest

from rlft.generation import DecoderSettings, SamplingSettings
from rlft.generation.settings import ONLINE_SAMPLING, misplaced_message, sampling_settings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"temperature": -0.1}, r"temperature must be >= 0 \(0 = greedy\), got -0.1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"num_samples": 0}, "num_samples must be >= 1, got 0"),
    ],
)
def test_sampling_settings_refuse_out_of_range_values(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend": "nope"}, r"unknown sampling backend 'nope'; choose one of \['hf', 'rlft', 'vllm'\]"),
        ({"batch_size": 0}, "batch_size must be >= 1 or null"),
        ({"vllm_gpu_memory_utilization": 1.5}, r"vllm_gpu_memory_utilization must be in \(0, 1\), got 1.5"),
        ({"decode_dtype": "bf16"}, "decode_dtype must be null, auto, bfloat16, float16 or float32: 'bf16'"),
        ({"decode_dtype": "bfloat16", "backend": "hf"}, "decode_dtype='bfloat16' needs backend 'rlft', got 'hf'"),
        ({"free_twin": True}, "free_twin=True needs a decode_dtype"),
    ],
)
def test_decoder_settings_refuse_what_cannot_work(fields, message):
    with pytest.raises(ValueError, match=message):
        DecoderSettings(**fields)


def test_each_entry_point_keeps_its_defaults():
    evaluation = SamplingSettings()  # evaluation and serving: greedy, 256 tokens, the backend's own top-k
    assert (evaluation.temperature, evaluation.max_new_tokens, evaluation.top_k) == (0.0, 256, None)
    assert (ONLINE_SAMPLING.temperature, ONLINE_SAMPLING.max_new_tokens, ONLINE_SAMPLING.top_k) == (1.0, 64, 0)
    # a config's `sampling:` block overrides only what it names on top of the online default
    partial = sampling_settings({"max_new_tokens": 8}, ONLINE_SAMPLING, online=True)
    assert (partial.temperature, partial.max_new_tokens, partial.top_k) == (1.0, 8, 0)
    assert DecoderSettings().backend == "rlft" and DecoderSettings(backend="auto").backend == "auto"


def test_online_settings_refuse_what_rollouts_do_not_do():
    with pytest.raises(ValueError, match="sampling.num_samples=2: online methods sample `group_size` per prompt"):
        sampling_settings({"num_samples": 2}, ONLINE_SAMPLING, online=True)
    with pytest.raises(ValueError, match=r"sampling.stop \(strings\) is for evaluation and serving"):
        sampling_settings({"stop": ["\n"]}, ONLINE_SAMPLING, online=True)


def test_a_decoder_key_under_sampling_says_where_it_goes():
    with pytest.raises(ValueError) as caught:
        sampling_settings({"max_new_tokens": 8, "decode_dtype": "auto"}, ONLINE_SAMPLING)
    assert str(caught.value) == (
        "sampling.decode_dtype is a decoder setting: move it from `sampling:` to `decoder:` "
        "(model.decoder.decode_dtype)"
    )
    assert "(model.decoder.batch_size)" in misplaced_message(["generation_batch_size"])
    assert misplaced_message(["backend", "lean_step"]).startswith(
        "sampling.backend, sampling.lean_step are decoder settings: move them"
    )
