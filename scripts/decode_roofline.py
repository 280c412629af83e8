"""The decode roofline of this machine: one decoding step's matmuls at the model's shapes, timed alone.

A decoding step of a batch of ``B`` sequences multiplies a ``[B, in]`` activation by every linear layer's weight
(attention q/k/v/o, MLP gate/up/down, then the LM head). This runs exactly those matmuls back to back on random
weights — no attention over the cache, no norms, no sampling, no Python framework — so ``B / step time`` is the
most tokens per second any decoder can reach here at that batch size and dtype. Also prints a large square matmul
(peak FLOP/s) and a copy (memory bandwidth) for context.

With ``--model``, also times rlft's decoder on that model at the same batch sizes (one decoding step, sampling
included, prefill excluded: the difference of two runs of :func:`rlft.generation.decoder.decode` that never stop)
through the lean step and through the model's forward, and prints each as a share of the roofline.

    python scripts/decode_roofline.py                      # SmolLM2-135M shapes, fp32, torch's default threads
    python scripts/decode_roofline.py --dtype bfloat16 --threads 1
    python scripts/decode_roofline.py --dtype bfloat16 --model ~/.cache/rlft/models/smollm2-135m-instruct
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
    parser.add_argument("--model", help="a local causal LM whose decoding rlft times against the roofline")
    parser.add_argument("--repeats", type=int, default=5, help="decoder timings per batch size (median)")
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
    print(
        f"{args.dtype}, {torch.get_num_threads()} threads: {sum(w.numel() for w in weights) / 1e6:.1f} M linear "
        f"weights ({size / 1e9:.2f} GB), {flops / 1e6:.0f} MFLOP per token"
    )
    roofline = {}
    for batch in args.batches:
        inputs = {n: torch.randn(batch, n, dtype=dtype) for n in (h, i)}

        def step(inputs: dict = inputs) -> None:
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

        for _ in range(3):
            step()
        seconds = float("inf")
        for _ in range(5):  # a limit: the best of 5 rounds of 10 steps, so a noisy neighbour cannot lower it
            started = time.perf_counter()
            for _ in range(10):
                step()
            seconds = min(seconds, (time.perf_counter() - started) / 10)
        roofline[batch] = seconds
        print(
            f"  batch {batch:3d}: {seconds * 1e3:7.1f} ms per step  {batch / seconds:7.0f} tokens/s  "
            f"{batch * flops / seconds / 1e9:6.1f} GFLOP/s  {size / seconds / 1e9:5.1f} GB/s of weights"
        )
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
    if args.model:
        del weights
        time_decoder(args.model, dtype, roofline, args.repeats)


def time_decoder(path: str, dtype: torch.dtype, roofline: dict, repeats: int) -> None:
    import statistics

    from transformers import AutoModelForCausalLM

    from rlft.generation.decoder import decode, decoding_twin

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    # a bf16 run decodes the way a rollout does: the fp32 policy's bf16 twin
    model = policy if dtype == torch.float32 else decoding_twin(policy, dtype)
    short, long = 8, 40

    def seconds(batch: int, new_tokens: int, lean: bool) -> float:
        prompts = torch.randint(100, model.config.vocab_size, (batch, 32))
        started = time.perf_counter()
        decode(model, prompts, torch.ones_like(prompts), max_new_tokens=new_tokens, stop_ids=[-1], pad_id=0, lean=lean)
        return time.perf_counter() - started

    print(f"rlft's decoder on {path} ({dtype}), one step incl. sampling, median of {repeats}:")
    for batch, limit in roofline.items():
        steps = {}
        for lean in (True, False):
            seconds(batch, short, lean)  # warm-up
        for lean in (True, False) * repeats:  # interleaved, so drift hits both alike
            steps.setdefault(lean, []).append(
                (seconds(batch, long, lean) - seconds(batch, short, lean)) / (long - short)
            )
        cells = []
        for name, lean in (("lean step", True), ("forward", False)):
            step = statistics.median(steps[lean])
            cells.append(f"{name} {step * 1e3:6.1f} ms = {batch / step:5.0f} tokens/s ({limit / step:4.0%})")
        cells = "   ".join(cells)
        print(f"  batch {batch:3d}: {cells}")


if __name__ == "__main__":
    main()
