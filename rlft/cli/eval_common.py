"""What every ``rlft eval`` subcommand shares: loading the model, the batched generator, writing the result."""

from __future__ import annotations

from rlft.eval.results import metrics_table, write_result


def load_for_eval(model: str, device: str | None = None, dtype: str | None = None, quantization: str | None = None):
    """``(model, tokenizer)`` for any rlft model string (adapters stay unmerged, weights frozen), on ``device``."""
    from rlft.cli.inference import load_for_inference

    return load_for_inference(model, device=device, dtype=dtype, quantization=quantization)


def eval_generator(lm, tok, model: str, batch_size: int = 8):
    """The batched generator (``batch_size`` sequences per forward); with vLLM installed and a GPU, vLLM serves model
    folders/hub ids, and adapter folders through its LoRA support on top of their base."""
    from rlft.generation.generator import Generator
    from rlft.generation.settings import DecoderSettings
    from rlft.generation.vllm import vllm_usable

    model_path = adapter_path = None
    if vllm_usable() and not model.endswith(".ckpt"):
        from rlft.models import resolve_model

        ref = resolve_model(model)
        if ref.gguf_file is None:
            model_path, adapter_path = ref.path, ref.adapter
    decoder = DecoderSettings(backend="auto", batch_size=batch_size)
    return Generator(lm, tok, decoder, model_path=model_path, adapter_path=adapter_path)


def finish(result: dict, out: str, name: str | None = None) -> None:
    """Write ``<out>/<name>.json`` and ``.md`` (default name: the result's kind) and print the metrics table."""
    json_path, _ = write_result(result, out, name=name)
    print(metrics_table(result["metrics"], title=f"{result['kind']}: {result['model']}"))
    print(f"results written to {json_path}")
