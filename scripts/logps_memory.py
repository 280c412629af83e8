"""Peak memory of per-token log-probs on a large-vocabulary model: full logits vs rlft's chunked paths.

A random-init Gemma-3-shaped decoder with Gemma's 262,144-token vocabulary (2 layers, hidden 640, LoRA on all
linear layers, tied frozen embeddings) scores ``--batch`` sequences of ``--length`` tokens, forward and backward,
each way in its own fresh process; the peak RSS growth over the step is read from Linux's resettable VmHWM with
large allocations taken straight from mmap (so RSS follows live tensors, not glibc's retained heap).

    python scripts/logps_memory.py --batch 8 --length 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    import peft
    import transformers
    from rlft.models import find_linear_targets
    from rlft.logprobs import gather_logps, hidden_logps

    mode, batch, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    def kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field))

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                           head_dim=256, final_logit_softcapping=None)
    base = transformers.Gemma3ForCausalLM(config)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=find_linear_targets(base), task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora).train()
    ids = torch.randint(0, config.vocab_size, (batch, length))
    labels = ids[:, 1:]
    lm = model.get_base_model()

    def step():
        if mode == "full_logits":  # what a plain causal-LM forward gives: [B, T, V] logits, fp32 log-softmax
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]
        if mode == "chunked_logits":  # rlft.logprobs.gather_logps on the model's logits
            return gather_logps(model(input_ids=ids, use_cache=False).logits[:, :-1], labels)
        hidden = lm.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # rlft: never builds logits
        return hidden_logps(hidden, lm.get_output_embeddings().weight, labels)

    step().sum().backward()  # warm-up at full size: one-time allocations are not charged to the measured step
    model.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = kib("VmRSS")
    step().sum().backward()
    print(json.dumps({"mode": mode, "peak_mib": (kib("VmHWM") - base) / 1024, "model_rss_mib": base / 1024}))
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("needs Linux (/proc/self/clear_refs resets the peak RSS)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    rows = []
    for mode in ("hidden_states", "chunked_logits", "full_logits"):
        cmd = [sys.executable, "-c", WORKER, mode, str(args.batch), str(args.length)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    logits_mib = args.batch * args.length * 262144 * 4 / 2**20
    print(
        f"Gemma-3-shaped, vocab 262,144, batch {args.batch} x {args.length} tokens "
        f"(one fp32 [B, T, V] tensor = {logits_mib:,.0f} MiB)"
    )
    full = next(r["peak_mib"] for r in rows if r["mode"] == "full_logits")
    print(f"{'log-probs from':<18}{'peak step MiB':>15}{'vs full logits':>16}")
    for row in rows:
        print(f"{row['mode']:<18}{row['peak_mib']:>15,.0f}{row['peak_mib'] / full:>16.3f}")


if __name__ == "__main__":
    main()
