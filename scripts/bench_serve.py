"""Tokens/s and latency of `rlft serve` (continuous vs windowed batching) against `rlft generate`'s loop, on CPU.

    python scripts/bench_serve.py --model smollm2-135m-instruct --clients 8 --max_tokens 64

`rlft generate` is timed in-process, one prompt at a time. Then, for each `--batching` mode, a fresh `rlft serve` on
a free loopback port answers (a) one client at a time, (b) `--clients` concurrent clients with the same budget and
(c) the same clients with mixed budgets (max_tokens cycling through 1/4, 1/2, 3/4 and all of `--max_tokens`), the
case where a windowed batch runs as long as its longest reply. Completion tokens are the server's usage counts;
every request is greedy, so both modes must return the same texts (checked).
"""

from __future__ import annotations

import argparse
import statistics
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


def _serve_mode(model: str, batching: str, clients: int, max_tokens: int) -> tuple[dict, dict]:
    import openai

    from tests.serve.conftest import Server

    server = Server(model, "--served_model_name", "bench", "--batching", batching, "--batch_window_ms", "20")
    answers: dict = {}
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=900)

        def ask(i: int, budget: int) -> tuple[int, float]:
            started = time.perf_counter()
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            reply = client.chat.completions.create(model="bench", messages=messages, max_tokens=budget, temperature=0)
            answers[(i, budget)] = reply.choices[0].message.content
            return reply.usage.completion_tokens, time.perf_counter() - started

        ask(0, 4)  # warm-up
        figures = {}
        start = time.perf_counter()
        produced = sum(ask(i, max_tokens)[0] for i in range(len(PROMPTS)))
        figures["one client at a time"] = (produced / (time.perf_counter() - start), None)
        workloads = {
            f"{clients} concurrent, same max_tokens": [max_tokens] * clients,
            f"{clients} concurrent, mixed max_tokens": [max_tokens * (1 + i % 4) // 4 for i in range(clients)],
        }
        for name, budgets in workloads.items():
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(ask, range(clients), budgets))
            elapsed = time.perf_counter() - start
            figures[name] = (sum(r[0] for r in results) / elapsed, statistics.median(r[1] for r in results))
    finally:
        server.stop()
    return figures, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()
    import torch

    from rlft.cli.generate import generate_reply
    from rlft.cli.inference import load_for_inference

    model, tokenizer = load_for_inference(args.model, device="cpu")
    start, produced = time.perf_counter(), 0
    for prompt in PROMPTS:
        reply = generate_reply(model, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens=args.max_tokens)
        produced += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    generate_speed = produced / (time.perf_counter() - start)
    del model

    modes = {mode: _serve_mode(args.model, mode, args.clients, args.max_tokens) for mode in ("continuous", "window")}
    same = modes["continuous"][1] == modes["window"][1]
    print(f"{args.model}, up to {args.max_tokens} new tokens, greedy, CPU ({torch.get_num_threads()} threads):")
    print(f"  rlft generate (one prompt at a time): {generate_speed:.1f} tokens/s")
    for mode, (figures, _) in modes.items():
        for name, (speed, latency) in figures.items():
            median = f", median latency {latency:.1f} s" if latency is not None else ""
            print(f"  rlft serve --batching {mode:<10} {name:<34} {speed:6.1f} tokens/s{median}")
    print(f"  same texts from both modes: {same}")


if __name__ == "__main__":
    main()
