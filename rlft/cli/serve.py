"""``rlft serve MODEL``: an OpenAI-compatible server (``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``).

Any model string works (alias, hub id, folder, adapter folder, ``.ckpt``, ``.gguf``). With rlft's own decoder,
requests are batched continuously: a new request joins the running batch at the next token and a finished one
leaves it (``--batching continuous``, the default where the model's layers are all full attention). ``--batching
window`` instead collects requests with the same settings for ``--batch_window_ms`` and runs them as one batch to
its end. With vLLM installed and a GPU present (``--backend auto``/``vllm``), vLLM generates; an adapter folder is
served through its LoRA support.

One request cannot take the server: at most ``--max_prompts_per_request`` prompts, ``n`` up to ``--max_n``, prompt
text up to ``--max_prompt_bytes`` (400/413 with an OpenAI error body past them), and prompts x ``n`` rows decoded in
chunks of ``--max_batch_size``. Prompts are tokenised off the event loop, and a client that hangs up (streaming or
not) stops its generation at the next token.

    rlft serve runs/sft-smollm2/hf_model --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "hf_model", "messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from rlft.cli.inference import add_inference_arguments
from rlft.cli.options import check_listen


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlft serve", description=__doc__, default_config_files=[])
    parser.add_argument("model", help="hub id, local folder, adapter folder, .gguf, .ckpt or alias")
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--served_model_name",
        type=str | None,
        default=None,
        help="name clients pass as 'model' (default: the alias or folder name)",
    )
    parser.add_argument(
        "--backend",
        type=Literal["auto", "hf", "vllm"],
        default="auto",
        help="auto = vLLM when installed with a GPU, else rlft's Hugging Face generator",
    )
    add_inference_arguments(parser)
    parser.add_argument(
        "--batching",
        type=Literal["auto", "continuous", "window"],
        default="auto",
        help="auto = continuous with rlft's decoder when the model allows it, else window",
    )
    parser.add_argument(
        "--batch_window_ms",
        type=float,
        default=10.0,
        help="window batching: how long a request waits for others to share its batch",
    )
    parser.add_argument(
        "--max_batch_size",
        type=PositiveInt,
        default=32,
        help="most rows (samples) decoded together; more prompts x n run in chunks",
    )
    parser.add_argument(
        "--default_max_tokens",
        type=PositiveInt,
        default=256,
        help="max_tokens when a request gives none (shortened to what the context leaves)",
    )
    parser.add_argument(
        "--max_prompts_per_request",
        type=PositiveInt,
        default=64,
        help="most prompts in one /v1/completions request (more: 400)",
    )
    parser.add_argument("--max_n", type=PositiveInt, default=16, help="most choices (n) per prompt (more: 400)")
    parser.add_argument(
        "--max_prompt_bytes",
        type=PositiveInt,
        default=1 << 20,
        help="most UTF-8 bytes of prompt text per request (more: 413)",
    )
    parser.add_argument(
        "--log_level", type=Literal["critical", "error", "warning", "info", "debug", "trace"], default="warning"
    )
    return parser


def build_engine(
    model: str,
    *,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    batching: str = "auto",
    batch_window_ms: float = 10.0,
    max_batch_size: int = 32,
):
    """Load ``model`` and wrap it in a batching engine (vLLM loads its own copy of the weights)."""
    from rlft.cli.inference import load_for_inference, resolve_inference
    from rlft.generation.generator import Generator
    from rlft.generation.settings import DecoderSettings
    from rlft.generation.vllm import vllm_usable
    from rlft.models import load_tokenizer, resolve_model
    from rlft.models.checkpoint import is_checkpoint
    from rlft.serve import ContinuousEngine, Engine, supports_continuous

    # continuous batching is rlft's own decoder: asking for it keeps `--backend auto` off vLLM
    auto_vllm = backend == "auto" and batching != "continuous" and vllm_usable() and not is_checkpoint(model)
    use_vllm = backend == "vllm" or auto_vllm
    if use_vllm:
        if quantization:
            raise ValueError("--quantization is for the Hugging Face backend; vLLM takes quantized checkpoints")
        ref = resolve_model(model)
        if ref.gguf_file:
            raise ValueError("serve a .gguf with --backend hf (or export it to a merged folder for vLLM)")
        _, dtype = resolve_inference(device, dtype, None)
        tokenizer = load_tokenizer(model)
        vllm = DecoderSettings(backend="vllm", batch_size=max_batch_size)
        generator = Generator(None, tokenizer, vllm, model_path=ref.path, adapter_path=ref.adapter, dtype=dtype)
        config_source = ref.path
        if batching == "continuous":
            raise ValueError("--batching continuous is rlft's decoder; vLLM batches on its own (use --backend hf)")
    else:
        network, tokenizer = load_for_inference(model, device=device, dtype=dtype, quantization=quantization)
        if batching == "continuous" and not supports_continuous(network):
            raise ValueError(
                "--batching continuous needs full attention in every layer; this model has "
                "sliding-window layers: use --batching window"
            )
        max_context = _max_context(network.config, tokenizer)
        if batching != "window" and supports_continuous(network):
            return ContinuousEngine(network, tokenizer, max_context=max_context, max_batch_size=max_batch_size)
        generator = Generator(network, tokenizer, DecoderSettings(backend="hf", batch_size=max_batch_size))
        config_source = network.config
    return Engine(
        generator,
        tokenizer,
        max_context=_max_context(config_source, tokenizer),
        batch_window_ms=batch_window_ms,
        max_batch_size=max_batch_size,
    )


def _max_context(config, tokenizer) -> int:
    if isinstance(config, str):
        import transformers

        config = transformers.AutoConfig.from_pretrained(config)
    text = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(value := getattr(text, attr, None), int):
            return value
    return min(tokenizer.model_max_length, 1 << 20)


def default_name(model: str) -> str:
    """The alias or hub id as given; a path's folder or file name."""
    path = Path(os.path.expanduser(model))
    return path.name if model.startswith((".", "/", "~")) or path.exists() else model


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if not 0 <= args.batch_window_ms < float("inf"):
        raise ValueError(f"--batch_window_ms must be a finite number >= 0, got {args.batch_window_ms}")
    check_listen(args.host, args.port)  # before the model loads, not after
    import uvicorn

    from rlft.serve import create_app
    from rlft.serve.limits import RequestLimits

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = build_engine(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        batching=args.batching,
        batch_window_ms=args.batch_window_ms,
        max_batch_size=args.max_batch_size,
    )
    name = args.served_model_name or default_name(args.model)
    limits = RequestLimits(
        max_prompts_per_request=args.max_prompts_per_request, max_n=args.max_n, max_prompt_bytes=args.max_prompt_bytes
    )
    app = create_app(engine, name, default_max_tokens=args.default_max_tokens, limits=limits)
    print(
        f"rlft serve: {args.model} as '{name}' ({engine.backend_name}) on http://{args.host}:{args.port}/v1", flush=True
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.close()
