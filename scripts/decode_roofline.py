"""The decode roofline of this machine: one decoding step's matmuls at the model's shapes, timed alone.

A decoding step of a batch of ``B`` sequences multiplies a ``[B, in]`` activation by every linear layer's weight
(attention q/k/v/o, MLP gate/up/down, then the LM head). This runs exactly those matmuls back to back on random
weights — no attention over the cache, no norms, no sampling, no Python framework — so ``B / step time`` is the
most tokens per second any decoder can reach here at that batch size and dtype. Also prints a large square matmul
(peak FLOP/s) and a copy (memory bandwidth) for context.

    python scripts/decode_roofline.py                      # SmolLM2-135M shapes, fp32, torch's default threads
    python scripts/decode_roofline.py --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--kv", type=int, default=192, help="key/value projection width (kv heads x head dim)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    h, i, kv = args.hidden, args.intermediate, args.kv
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * args.layers + [(args.vocab, h)]
    torch.manual_seed(0)
    weights = [torch.randn(o, n, dtype=dtype) for o, n in shapes]
    flops = sum(2 * o * n for o, n in shapes)
    size = sum(w.numel() * w.element_size() for w in weights)
    print(f"{args.dtype}, {torch.get_num_threads()} threads: {sum(w.numel() for w in weights) / 1e6:.1f} M linear "
          f"weights ({size / 1e9:.2f} GB), {flops / 1e6:.0f} MFLOP per token")  # fmt: skip
    for batch in args.batches:
        inputs = {n: torch.randn(batch, n, dtype=dtype) for n in (h, i)}

        def step(inputs: dict = inputs) -> None:
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

        for _ in range(3):
            step()
        repeats = 10
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        seconds = (time.perf_counter() - started) / repeats
        print(f"  batch {batch:3d}: {seconds * 1e3:7.1f} ms per step  {batch / seconds:7.0f} tokens/s  "
              f"{batch * flops / seconds / 1e9:6.1f} GFLOP/s  {size / seconds / 1e9:5.1f} GB/s of weights")  # fmt: skip
    square = torch.randn(2048, 2048, dtype=dtype)
    started = time.perf_counter()
    for _ in range(5):
        square @ square
    print(f"  square 2048 matmul: {5 * 2 * 2048**3 / (time.perf_counter() - started) / 1e9:.1f} GFLOP/s")
    source = torch.empty(64 * 2**20)
    target = torch.empty_like(source)
    target.copy_(source)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    seconds = time.perf_counter() - started
    print(f"  copy: {10 * 2 * source.numel() * 4 / seconds / 1e9:.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
