"""``rlft eval rouge``: ROUGE-1/2/L of a model's greedy answers against the reference replies of an SFT file."""

from __future__ import annotations

from rlft.cli.eval_common import eval_generator, finish, load_for_eval
from rlft.cli.inference import Quantization
from rlft.eval.results import make_result


def rouge(
    model: str,
    data: str,
    format: str = "auto",
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """ROUGE-1/2/L F1 (rouge-score, Porter stemming) of greedy answers against each record's last assistant reply.

    Args:
        model: Model string (hub id, folder, adapter folder, .ckpt, .gguf or alias).
        data: Data file/folder/hub name in any rlft SFT format with an assistant reply after a prompt (messages,
            Alpaca, ShareGPT, seed tasks, ...): the conversation before the last assistant turn is the prompt.
        format: Input format name, or "auto" to detect it.
        limit: Use only the first N records.
        max_new_tokens: Answer budget.
        batch_size: Prompts decoded together.
        out: Output folder.
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    from rlft.eval.data import load_records
    from rlft.eval.rouge import generated_rouge
    from rlft.generation.settings import SamplingSettings

    records = load_records(data, kind="sft", format=format, limit=limit)
    lm, tok = load_for_eval(model, device, dtype, quantization)
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    metrics, rows = generated_rouge(eval_generator(lm, tok, model, batch_size), records, settings)
    config = {"data": data, "limit": limit, "max_new_tokens": max_new_tokens}
    finish(make_result("rouge", model, {**metrics, "n": len(rows)}, config=config, details={"rows": rows}), out)
