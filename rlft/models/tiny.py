"""Tiny random-init models of each supported architecture, built from configs (no download).

They make every config, test and demo path runnable offline in seconds: ``tiny-llama``, ``tiny-mistral``,
``tiny-qwen2``, ``tiny-qwen3``, ``tiny-gemma``, ``tiny-gpt2`` and ``tiny-opt`` are registry aliases that build a
2-layer model with a shared byte-level BPE tokenizer. Each family gets the chat template its real models use, so
template-dependent code (assistant masks, BOS handling) is exercised on several templates.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

_CORPUS = """The quick brown fox jumps over the lazy dog. Language models learn to predict the next token.
Reinforcement learning from human feedback aligns a policy with human preferences. The reward model scores
responses; direct preference optimisation skips it. What is the capital of France? The capital of France is Paris.
Write a function that adds two numbers. def add(a, b): return a + b. Translate to French: good morning -> bonjour.
User: hello! Assistant: Hi, how can I help you today? Please summarise the following text in one sentence.
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " # @ % & | _ ~ ^ $ \\ \n\t"""

# family -> (transformers config class name, config kwargs, chat template, bos token or None, eos token)
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_ARCHITECTURES: dict[str, tuple[str, dict, str, str | None, str]] = {
    "llama": ("LlamaConfig", dict(_SMALL), LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": ("MistralConfig", dict(_SMALL), CHATML_TEMPLATE, None, "<|im_end|>"),
    "qwen2": ("Qwen2Config", dict(_SMALL), CHATML_TEMPLATE, None, "<|im_end|>"),
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=16), CHATML_TEMPLATE, None, "<|im_end|>"),
    "gemma": ("GemmaConfig", dict(_SMALL, head_dim=16), GEMMA_TEMPLATE, "<bos>", "<end_of_turn>"),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024), CHATML_TEMPLATE, None, "<|im_end|>"),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=1024,
        ),
        CHATML_TEMPLATE,
        "</s>",
        "<|im_end|>",
    ),
}


def build_tiny_tokenizer(family: str = "llama", vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer with the chat template of ``family``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    _, _, template, bos, eos = TINY_ARCHITECTURES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if bos is not None:  # like Llama/Gemma tokenizers: BOS added by the tokenizer *and* by the chat template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>", unk_token=None
    )
    wrapped.chat_template = template
    return wrapped


def build_tiny_model(
    family: str, tokenizer: transformers.PreTrainedTokenizerBase, seed: int = 0
) -> transformers.PreTrainedModel:
    """A 2-layer random-init causal LM of ``family`` whose weights depend only on ``seed``."""
    config_name, kwargs, *_ = TINY_ARCHITECTURES[family]
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), **kwargs, **ids)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def write_tiny_model(family: str, target: Path) -> Path:
    """Build ``tiny-<family>`` and save it as an ordinary Hugging Face folder."""
    tokenizer = build_tiny_tokenizer(family)
    model = build_tiny_model(family, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
