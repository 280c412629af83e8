"""A random-init Gemma-3-270M-shaped model (262,144-token vocabulary, 18 layers, hidden 640) for memory runs.

The weights are random and the tokenizer is SmolLM2's (its ids are a subset of the vocabulary): enough to measure
what a 262k vocabulary costs a training run, offline. README, *Log-prob memory on a 262k vocabulary*:

    python scripts/make_gemma270.py /tmp/gemma270
    /usr/bin/time -v rlft fit -c configs/dpo/smollm2_lora.yaml --model.init_args.model /tmp/gemma270 ...
"""

from __future__ import annotations

import sys

import torch
import transformers

from rlft.models import resolve_model

if __name__ == "__main__":
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        query_pre_attn_scalar=256,
        final_logit_softcapping=None,
    )
    transformers.Gemma3ForCausalLM(config).save_pretrained(sys.argv[1])
    transformers.AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct").path).save_pretrained(sys.argv[1])
