"""Tokenizer metadata for a GGUF file, written the way llama.cpp's own converter writes it.

Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen2/3 and rlft's tiny models) become
``tokenizer.ggml.model = "gpt2"`` with the token list, token types, merges and the pre-tokenizer name llama.cpp
uses to split text before BPE. The pre-tokenizer is read from ``tokenizer.json`` itself (its regex and steps), so
llama.cpp splits text exactly as the Hugging Face tokenizer being exported does. SentencePiece-style BPE with byte
fallback (Llama 2, Mistral v0.1, Gemma) becomes ``"llama"`` through ``gguf.LlamaHfVocab``. Special tokens, the
``add_bos``/``add_eos`` flags and the chat template go through ``gguf.SpecialVocab``.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

# Split regexes of the byte-level BPE pre-tokenizers llama.cpp implements, by its pre-tokenizer name.
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # noqa: E501
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",  # noqa: E501
}


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``.

    Raises:
        ValueError: the pre-tokenizer is not one llama.cpp reproduces (exporting it would tokenise differently).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2 regex after splitting every digit (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_REGEXES:
            return _SPLIT_REGEXES[pattern]
    raise ValueError(
        f"tokenizer.json: pre_tokenizer {json.dumps(pre)[:300]} is not one llama.cpp reproduces "
        f"(known: GPT-2 byte level, SmolLM digits + byte level, Llama 3 and Qwen2 split regexes)"
    )


def add_vocab(writer: gguf.GGUFWriter, folder: Path, tokenizer, vocab_size: int) -> str:
    """Write the tokenizer of the Hugging Face folder ``folder`` into ``writer``; returns the tokenizer model.

    Args:
        writer: The GGUF writer.
        folder: Folder holding ``tokenizer.json`` (and ``tokenizer_config.json`` / chat template).
        tokenizer: The loaded tokenizer of that folder (for added tokens and the BOS/EOS behaviour).
        vocab_size: Rows of the embedding matrix; ids the tokenizer lacks become ``[PAD{id}]`` placeholders.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: GGUF export needs a fast tokenizer (tokenizer.json)")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = "llama"
        vocab = gguf.LlamaHfVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        if len(tokens) > vocab_size:
            raise ValueError(f"{path}: {len(tokens)} tokens but the model's vocabulary has {vocab_size} rows")
        missing = range(len(tokens), vocab_size)
        writer.add_token_list([*tokens, *(f"[PAD{i}]".encode() for i in missing)])
        writer.add_token_scores([*scores, *(-1000.0 for _ in missing)])
        writer.add_token_types([*types, *(gguf.TokenType.UNUSED for _ in missing)])
    elif model.get("type") == "BPE":
        kind = "gpt2"
        tokens, types = _bpe_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} cannot be exported to GGUF (BPE only)")
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size)
    # what the tokenizer really does on plain text, whatever its config files claim
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            special.special_token_ids[name] = token_id
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    return kind


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids ``0 .. vocab_size-1`` (as llama.cpp's converter does)."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has token id {max(by_id)} but the model's vocabulary has {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types
