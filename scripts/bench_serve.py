"""Tokens/s of `rlft serve` (one client, then N concurrent clients) against `rlft generate`'s loop, on CPU.

    python scripts/bench_serve.py --model smollm2-135m-instruct --clients 8 --max_tokens 64

Starts `rlft serve` on a free loopback port, asks with the openai client, stops the server. Completion tokens are
the server's own usage counts; `rlft generate` is timed in-process with the same prompts and budget.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a bicycle works.",
    "List five fruits and describe each in one sentence.",
    "What should I pack for a trip to the mountains?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()
    import httpx
    import openai
    import torch

    from rlft.cli.generate import generate_reply
    from rlft.cli.inference import load_for_inference
    from tests.serve.conftest import Server

    model, tokenizer = load_for_inference(args.model, device="cpu")
    start, produced = time.perf_counter(), 0
    for prompt in PROMPTS:
        reply = generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=args.max_tokens)
        produced += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    generate_speed = produced / (time.perf_counter() - start)
    del model

    server = Server(args.model, "--served_model_name", "bench", "--batch_window_ms", "20")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=600)

        def ask(i: int) -> int:
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            reply = client.chat.completions.create(model="bench", messages=messages, max_tokens=args.max_tokens,
                                                   temperature=0)  # fmt: skip
            return reply.usage.completion_tokens

        ask(0)  # warm-up
        start = time.perf_counter()
        single = sum(ask(i) for i in range(len(PROMPTS))) / (time.perf_counter() - start)
        health = server.base_url.removesuffix("/v1") + "/health"
        before = httpx.get(health).json()
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            total = sum(pool.map(ask, range(args.clients)))
        concurrent = total / (time.perf_counter() - start)
        calls = httpx.get(health).json()["generate_calls"] - before["generate_calls"]
    finally:
        server.stop()
    print(f"{args.model}, {args.max_tokens} new tokens, CPU ({torch.get_num_threads()} threads):")
    print(f"  rlft generate (one prompt at a time): {generate_speed:.1f} tokens/s")
    print(f"  rlft serve, 1 client at a time:       {single:.1f} tokens/s")
    print(f"  rlft serve, {args.clients} concurrent clients:     {concurrent:.1f} tokens/s ({calls} generate calls)")


if __name__ == "__main__":
    main()
