"""``rlft generate``: chat with any model string (base, adapter folder, ``.ckpt``), streaming to the terminal."""

from __future__ import annotations

import sys

from jsonargparse import ArgumentParser

from rlft.cli.inference import add_inference_arguments
from rlft.cli.options import check_options


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="rlft generate", description=__doc__, default_config_files=[])
    parser.add_argument("model", help="hub id, local folder, adapter folder, .gguf, .ckpt or alias")
    parser.add_argument("--prompt", type=str, nargs="+", default=None, help="user message(s); one reply each")
    parser.add_argument("--system", type=str | None, default=None, help="optional system message")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_inference_arguments(parser)
    parser.add_argument("--no_stream", action="store_true", help="print each reply when complete")
    return parser


def generate_reply(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> str:
    """One chat-templated reply (no double BOS: the template already holds it)."""
    import torch

    from rlft.models.tokens import stop_token_ids

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_token_ids(tokenizer, model),
            **sampling,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    check_options({name: args[name] for name in ("max_new_tokens", "temperature", "top_p", "seed")})
    import torch
    from transformers import TextStreamer

    from rlft.cli.inference import load_for_inference

    torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(
        args.model, device=args.device, dtype=args.dtype, quantization=args.quantization
    )
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    prompts = args.prompt or _read_stdin_prompts()
    for prompt in prompts:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        print(f">>> {prompt}", flush=True)
        reply = generate_reply(
            model,
            tokenizer,
            messages,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            streamer=streamer,
        )
        if streamer is None:
            print(reply)


def _read_stdin_prompts() -> list[str]:
    if sys.stdin.isatty():
        print("enter a prompt per line (Ctrl-D to end):", file=sys.stderr)
    return [line.strip() for line in sys.stdin if line.strip()]
