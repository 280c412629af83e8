"""Iterative (online) DPO: each round the current policy samples K responses per prompt, the reward model scores
them, the best and the worst become a pair, and a DPO stage trains on those pairs with the reference fixed at the
start policy (Xiong et al. 2024, https://arxiv.org/abs/2312.11456; Xu et al. 2023, "Some things are more CRINGE
than others", https://arxiv.org/abs/2312.16682)::

    <run>/<stage>/round_<r>/pairs.jsonl      sampled pairs (+ sampling.json: rewards, pairs dropped and why)
    <run>/<stage>/round_<r>/                 an ordinary rlft fit run (config.yaml, checkpoints, hf_model, DONE)

Sampling runs as its own process (``python -m rlft.pipeline.online``) like every training round, so a finished
round is skipped and a killed one resumes.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import numpy as np


def sample_pairs(
    policy: str,
    reward_model: str,
    prompts_path: str,
    out: str,
    *,
    offset: int,
    count: int,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    min_margin: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
) -> dict:
    """Sample, score and pair; writes ``out`` (pairs JSONL) and returns the round's statistics.

    Prompts are the distinct prompts of ``prompts_path`` from ``offset`` on (wrapping around), so successive
    rounds see new prompts while there are any.
    """
    from rlft.eval.data import load_records
    from rlft.eval.reward_bench import load_reward_scorer
    from rlft.generation.generator import Generator
    from rlft.generation.settings import SamplingSettings
    from rlft.models import load_model, load_tokenizer

    seen, prompts = set(), []
    for record in load_records(prompts_path, kind="prompts"):
        key = json.dumps(record["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{prompts_path}: no prompts to sample from")
    chosen = [prompts[(offset + i) % len(prompts)] for i in range(min(count, len(prompts)))]
    lm, tok = load_model(policy, trainable_adapter=False), load_tokenizer(policy)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        num_samples=samples_per_prompt,
        seed=seed,
    )
    rows = batch_size * (samples_per_prompt if temperature > 0 else 1)  # `batch_size` prompts per forward
    samples = Generator(lm, tok).generate(chosen, settings, batch_size=rows)
    del lm
    gc.collect()
    scorer = load_reward_scorer(reward_model)
    flat_prompts = [p for p, group in zip(chosen, samples) for _ in group]
    rewards = scorer.score_exchanges(flat_prompts, [s for group in samples for s in group])
    pairs, skipped = pair_samples(chosen, samples, rewards, min_margin=min_margin)
    if not pairs:
        raise ValueError(
            f"online_dpo: no usable pair left from {len(chosen)} prompts (dropped: "
            f"{describe_skipped(skipped)}); raise temperature, samples_per_prompt or max_new_tokens, "
            "or lower min_margin"
        )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    margins = [p["chosen_reward"] - p["rejected_reward"] for p in pairs]
    stats = {
        "prompts": len(chosen),
        "pairs": len(pairs),
        "skipped": skipped,
        "mean_sample_reward": float(np.mean(rewards)),
        "mean_pair_margin": float(np.mean(margins)),
    }
    Path(out).with_name("sampling.json").write_text(json.dumps(stats, indent=2))
    return stats


SKIP_REASONS = {
    "empty": "empty reply",
    "identical": "chosen == rejected",
    "small_margin": "reward margin <= min_margin",
}


def pair_samples(prompts: list, samples: list[list[str]], rewards, *, min_margin: float = 0.0) -> tuple[list, dict]:
    """The best- and worst-scored sample of each prompt as a pair, and how many prompts gave no usable pair.

    ``rewards`` is flat, in the order of ``samples``. A pair is dropped (and counted under its reason) when its
    chosen or rejected reply is empty once stripped (a policy can sample EOS first, and a reward model may well
    rank that reply worst; DPO's data checks refuse an empty reply, so one such pair would fail the whole round's
    fit), when chosen == rejected, or when the reward margin is at most ``min_margin``.
    """
    pairs, skipped, cursor = [], dict.fromkeys(SKIP_REASONS, 0), 0
    for prompt, group in zip(prompts, samples):
        scores = np.asarray(rewards[cursor : cursor + len(group)], dtype=float)
        cursor += len(group)
        best, worst = int(scores.argmax()), int(scores.argmin())
        chosen, rejected = group[best], group[worst]
        if not chosen.strip() or not rejected.strip():
            skipped["empty"] += 1
        elif chosen.strip() == rejected.strip():
            skipped["identical"] += 1
        elif scores[best] - scores[worst] <= min_margin:
            skipped["small_margin"] += 1
        else:
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "chosen_reward": float(scores[best]),
                    "rejected_reward": float(scores[worst]),
                }
            )
    return pairs, skipped


def describe_skipped(skipped: dict) -> str:
    """``"2 empty reply, 1 chosen == rejected"`` (or ``"none"``) for logs and errors."""
    return ", ".join(f"{n} {SKIP_REASONS.get(k, k)}" for k, n in skipped.items() if n) or "none"


def run_online_dpo(runner, name: str, stage, train_path: str) -> None:
    """All rounds of an online DPO stage (``name``: its folder), each round's sampling and DPO fit as subprocesses."""
    folder = runner.stage_dir(name)
    start = str(runner.model_of(stage.init)) if stage.init else runner._base_model(stage)
    reward_model = str(runner.model_of(stage.reward))
    policy = start
    for r in range(1, stage.rounds + 1):
        round_dir = folder / f"round_{r}"
        if runner.is_done(round_dir):
            print(f"rlft pipeline: {name} round {r} already DONE, skipped", flush=True)
            policy = str(round_dir / "hf_model")
            continue
        pairs = round_dir / "pairs.jsonl"
        if not (round_dir / "sampling.json").exists():
            print(
                f"rlft pipeline: {name} round {r}: sampling {stage.samples_per_prompt} responses for "
                f"{stage.prompts_per_round} prompts (log: {round_dir / 'stage.log'})",
                flush=True,
            )
            argv = [
                runner.python,
                "-m",
                "rlft.pipeline.online",
                "--policy",
                policy,
                "--reward_model",
                reward_model,
                "--prompts",
                train_path,
                "--out",
                str(pairs),
                "--offset",
                str((r - 1) * stage.prompts_per_round),
                "--count",
                str(stage.prompts_per_round),
                "--samples_per_prompt",
                str(stage.samples_per_prompt),
                "--max_new_tokens",
                str(stage.max_new_tokens),
                "--temperature",
                str(stage.temperature),
                "--min_margin",
                str(stage.min_margin),
                "--seed",
                str(r),
            ]
            runner._run_process(f"{name} round {r} sampling", argv, round_dir / "stage.log")
        stats = json.loads((round_dir / "sampling.json").read_text())
        print(
            f"rlft pipeline: {name} round {r}: {stats['pairs']} pairs from {stats['prompts']} prompts "
            f"(dropped: {describe_skipped(stats['skipped'])})",
            flush=True,
        )
        config = runner.fit_config(name, stage, round_dir, data_path=str(pairs), model=policy)
        # the reference stays the start policy in every round (computed once per round from it)
        from rlft.pipeline.config import set_dotted

        set_dotted(config, "model.reference", "precomputed")
        set_dotted(config, "model.ref_model", start)
        runner.run_fit(f"{name} round {r}", config, round_dir, round_dir / "hf_model")
        policy = str(round_dir / "hf_model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlft.pipeline.online", description=sample_pairs.__doc__)
    for name in ("policy", "reward_model", "prompts", "out"):
        parser.add_argument(f"--{name}", required=True)
    for name, kind in (
        ("offset", int),
        ("count", int),
        ("samples_per_prompt", int),
        ("max_new_tokens", int),
        ("temperature", float),
        ("min_margin", float),
        ("seed", int),
        ("batch_size", int),
    ):
        parser.add_argument(f"--{name}", type=kind, default={"min_margin": 0.0, "seed": 0, "batch_size": 8}.get(name))
    args = vars(parser.parse_args(argv))
    stats = sample_pairs(args.pop("policy"), args.pop("reward_model"), args.pop("prompts"), args.pop("out"), **args)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
