"""The pipeline's evaluation stage: on held-out data only,

* the reward model: accuracy and AUROC on held-out pairs, with 95 % bootstrap CIs;
* every policy (base, start, then each policy stage: DPO, ORPO, SimPO, GRPO, PPO, TRPO, online DPO ...) answering
  held-out prompts: mean reward (with CI), win rate vs the start judged by the reward model (bootstrap CI), the
  same two controlled for reply length, KL to the start, refusal rate, toxicity (and the classifiers that produced
  them), optionally lm-eval tasks.

Length control: the reward model may pay for length, so a policy that only got longer would look better. The slope
of reward on words *within* each policy's own answers (one intercept per policy,
:func:`rlft.metrics.within_group_slope`) is removed from every answer's reward before the paired comparison with
the start (``length_controlled_gain`` with a bootstrap CI, ``length_controlled_win_rate``).

KL(pi || pi_start) is estimated on the policy's own samples as the mean of
``sum_t log pi(y_t | x, y_<t) - log pi_start(y_t | x, y_<t)`` (unbiased at temperature 1).

Runs as ``python -m rlft.pipeline.evaluate --config <run>/evaluation/config.yaml`` (written by the runner).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)


def evaluation_config(runner) -> dict:
    """The evaluation stage's settings with every path resolved from the run folder."""
    settings = runner.config.evaluation
    stages = runner.config.stages
    policies: dict[str, str] = {}
    trained, sft, rm = runner.policy_stages(), runner.stage_of("sft"), runner.stage_of("rm")
    if trained:  # else: the reward model alone is evaluated
        if sft is not None:
            policies["base"] = runner._base_model(stages[sft])
        policies["start"] = runner.start_policy()
        for name in trained:
            policies[name] = str(runner.model_of(name))
    if rm is None:
        raise ValueError(f"{runner.config.source}: the evaluation needs a reward-model stage (method rm)")
    return {
        "policies": policies,
        "start": "start",
        "reward_model": str(runner.model_of(rm)),
        "heldout_pairs": str(runner.run_dir / "data" / "heldout_pairs.jsonl"),
        "out": str(runner.run_dir / "evaluation"),
        **vars(settings),
    }


def _bootstrap(values: np.ndarray, statistic, n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(n)]
    return [float(x) for x in np.quantile(stats, [0.025, 0.975])]


def response_logps(model, tokenizer, prompts: list, responses: list[str], batch_size: int = 8) -> list[float]:
    """Summed log-probability of each response's tokens after its chat-rendered prompt."""
    from rlft.eval.scoring import ScoringWindow, score_windows
    from rlft.generation.generator import encode_prompt_text

    windows, kept = [], []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        head = encode_prompt_text(tokenizer, prompt)
        tail = tokenizer(response, add_special_tokens=False)["input_ids"]
        if tail:
            windows.append(ScoringWindow(head + tail, list(range(len(head), len(head) + len(tail)))))
            kept.append(i)
    out = [0.0] * len(prompts)
    for i, scores in zip(kept, score_windows(model, windows, batch_size=batch_size)):
        out[i] = float(sum(scores))
    return out


def evaluate(cfg: dict) -> dict:
    from rlft.eval.data import load_records
    from rlft.eval.refusal import load_refusal_classifier
    from rlft.eval.reward_bench import (
        load_reward_scorer,
        load_toxicity_classifier,
        preference_accuracy,
    )
    from rlft.generation.generator import Generator
    from rlft.generation.settings import SamplingSettings
    from rlft.metrics import outcomes_from_scores, win_rate, within_group_slope
    from rlft.models import load_model, load_tokenizer

    pairs = load_records(cfg["heldout_pairs"], kind="pairs", limit=cfg.get("pairs_limit"))
    scorer = load_reward_scorer(cfg["reward_model"], max_length=cfg.get("rm_max_length", 1024))
    results: dict = {
        "reward_model": preference_accuracy(scorer, pairs, n_bootstrap=cfg["n_bootstrap"], seed=cfg["seed"])
    }
    if not cfg["policies"]:
        return {
            **results,
            "start": None,
            "n_prompts": 0,
            "policies": {},
            "refusal_classifier": None,
            "toxicity_classifier": None,
            "examples": [],
        }
    seen, prompts = set(), []
    for p in pairs:
        key = json.dumps(p["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append(p["prompt"])
    prompts = prompts[: cfg["limit"]]
    settings = SamplingSettings(
        max_new_tokens=cfg["max_new_tokens"],
        temperature=cfg["temperature"],
        seed=cfg["seed"],
    )
    refusal = load_refusal_classifier(cfg["refusal"])
    toxicity = load_toxicity_classifier(cfg["toxicity"])
    start_name = cfg["start"]
    start_model = load_model(cfg["policies"][start_name], trainable_adapter=False)
    start_tok = load_tokenizer(cfg["policies"][start_name])
    answers, rewards, policies = {}, {}, {}
    for name, model_string in cfg["policies"].items():
        log.warning("evaluating policy %s (%s)", name, model_string)
        lm = start_model if name == start_name else load_model(model_string, trainable_adapter=False)
        tok = start_tok if name == start_name else load_tokenizer(model_string)
        texts = [s[0] for s in Generator(lm, tok).generate(prompts, settings, batch_size=cfg["batch_size"])]
        answers[name], rewards[name] = texts, np.asarray(scorer.score_exchanges(prompts, texts), dtype=float)
        entry: dict = {
            "model": model_string,
            "mean_reward": float(rewards[name].mean()),
            "mean_reward_ci": _bootstrap(rewards[name], np.mean, cfg["n_bootstrap"], cfg["seed"]),
            "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "refusal_rate": float(np.mean(refusal(texts))),
        }
        entry.update(toxicity.report(texts) if toxicity else {"toxicity": None})
        if name != start_name:
            own = np.asarray(response_logps(lm, tok, prompts, texts, cfg["batch_size"]))
            ref = np.asarray(response_logps(start_model, start_tok, prompts, texts, cfg["batch_size"]))
            entry["kl_to_start"] = float((own - ref).mean())
            entry["kl_to_start_ci"] = _bootstrap(own - ref, np.mean, cfg["n_bootstrap"], cfg["seed"])
        if cfg.get("lm_eval_tasks"):
            from rlft.eval.harness import run_lm_eval

            harness = run_lm_eval(lm, tok, cfg["lm_eval_tasks"], limit=cfg.get("lm_eval_limit"))
            entry["lm_eval"] = harness["results"]
        policies[name] = entry
        if lm is not start_model:
            del lm
            gc.collect()
    base = rewards[start_name]
    scale = abs(base.mean()) if abs(base.mean()) > 1e-8 else float("nan")
    words = {name: np.asarray([len(t.split()) for t in texts], dtype=float) for name, texts in answers.items()}
    # length control: the reward model may pay for length; the reward per word within each policy's own answers
    # takes the length difference out of a policy's gain (its reward at the start's reply lengths)
    slope = within_group_slope([rewards[n] for n in answers], [words[n] for n in answers])
    controlled = {name: rewards[name] - slope * words[name] for name in answers}
    for name, entry in policies.items():
        if name == start_name:
            continue
        entry["reward_gain"] = float(rewards[name].mean() - base.mean())
        entry["reward_gain_relative"] = float((rewards[name].mean() - base.mean()) / scale)
        # the gain in units of the start policy's reward spread: comparable across reward models' offsets
        entry["reward_gain_std"] = float((rewards[name].mean() - base.mean()) / (base.std() + 1e-8))
        entry["win_rate"] = win_rate(
            outcomes_from_scores(rewards[name], base), n_bootstrap=cfg["n_bootstrap"], seed=cfg["seed"]
        ).to_dict()
        paired = controlled[name] - controlled[start_name]
        entry["length_controlled_gain"] = float(paired.mean())
        entry["length_controlled_gain_ci"] = _bootstrap(paired, np.mean, cfg["n_bootstrap"], cfg["seed"])
        entry["length_controlled_win_rate"] = win_rate(
            outcomes_from_scores(controlled[name], controlled[start_name]),
            n_bootstrap=cfg["n_bootstrap"],
            seed=cfg["seed"],
        ).to_dict()
    results.update(
        start=start_name,
        n_prompts=len(prompts),
        length_slope=slope,
        policies=policies,
        refusal_classifier=refusal.name,
        toxicity_classifier=toxicity.name if toxicity else "none (not measured)",
        settings={k: cfg[k] for k in ("limit", "max_new_tokens", "temperature", "seed", "n_bootstrap")},
        examples=[
            {
                "prompt": prompts[i][-1]["content"],
                **{n: answers[n][i] for n in answers},
                "rewards": {n: float(rewards[n][i]) for n in answers},
            }
            for i in range(min(6, len(prompts)))
        ],
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlft.pipeline.evaluate", description=__doc__)
    parser.add_argument("--config", required=True, help="evaluation config YAML written by the pipeline runner")
    cfg = yaml.safe_load(Path(parser.parse_args(argv).config).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results = evaluate(cfg)
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps({k: results[k] for k in ("reward_model", "start")}, indent=2))


if __name__ == "__main__":
    main()
