"""TRL's PPO worker for ``run.py --mode ppo``: ``trl.experimental.ppo`` (TRL <= 1.12) on rlft's PPO bench work.

The same model, LoRA, prompts in the same order, response length, sampling (temperature 1, no truncation), KL
coefficient (k1), clip ranges, value coefficient, GAE (gamma 1, lambda 0.95), missing-EOS penalty 1, PPO epochs
(the whole rollout is one minibatch) and learning rate as rlft's worker in ``bench_online.py``; neither side
clips gradients (TRL's PPO never does). TRL's PPO only takes a reward *model* (a sequence classifier it runs on the
token ids), so rlft's rule reward is wrapped as one: :class:`RuleRewardModel` decodes each response and scores it
with the same reward code rlft's worker uses, which makes the two reward curves comparable.

TRL trains its value model as a second network: all of its weights by default (the ``loracritic`` variant gives it
the policy's LoRA, rlft's ``critic`` variant is the same work); rlft's default reads values off the policy's trunk.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

INSTALL = "pip install --no-deps --target .bench/trl-1.12 trl==1.12.0, then pass --trl_path .bench/trl-1.12"


class RuleRewardModel(torch.nn.Module):
    """A rule reward in the shape TRL's ``get_reward`` calls: ``getattr(model, model.base_model_prefix)(input_ids,
    attention_mask, ...)`` then ``model.score(hidden_states[-1])``, read at each row's last response token. The
    backbone writes each row's reward at every position, so whichever position TRL reads holds it."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer, prompts: list[list[int]], fields: list[dict], rewards, on_scores=None) -> None:
        super().__init__()
        self.backbone = _RuleBackbone(tokenizer, prompts, fields, rewards, on_scores)
        self.score = torch.nn.Identity()


class _RuleBackbone(torch.nn.Module):
    def __init__(self, tokenizer, prompts, fields, rewards, on_scores) -> None:
        super().__init__()
        self.tokenizer, self.rewards, self.on_scores = tokenizer, rewards, on_scores
        self.by_prompt = {tuple(ids): row for ids, row in zip(prompts, fields)}
        self.lengths = sorted({len(ids) for ids in prompts})

    def _split(self, tokens: list[int]) -> tuple[dict, list[int]]:
        for length in self.lengths:
            row = self.by_prompt.get(tuple(tokens[:length]))
            if row is not None:
                return row, tokens[length:]
        raise ValueError("a scored sequence does not start with any benchmark prompt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SimpleNamespace:
        prompts, texts, answers = [], [], []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            row, response = self._split([t for t, keep in zip(ids, mask) if keep])
            if self.tokenizer.eos_token_id in response:
                response = response[: response.index(self.tokenizer.eos_token_id)]
            prompts.append([{"role": "user", "content": row["prompt"]}])
            texts.append(self.tokenizer.decode(response, skip_special_tokens=True))
            answers.append(row["answer"])
        total, _ = self.rewards(prompts, texts, {"answer": answers})
        scores = torch.as_tensor([float(v) for v in total], dtype=torch.float32, device=input_ids.device)
        if self.on_scores is not None:
            self.on_scores(scores)
        hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(hidden,))


def _pad_token(tokenizer, prompts: list[list[int]]) -> int | None:
    """A special token no prompt holds and that is not the stop token: TRL's PPO treats every pad id as padding
    (SmolLM2 pads with its end-of-turn token, which each chat prompt contains)."""
    used = {t for ids in prompts for t in ids} | {tokenizer.eos_token_id}
    return next((i for i in tokenizer.all_special_ids if i not in used), None)


def run_trl(cfg, variant: str, workdir: Path) -> dict:
    import datasets
    import peft
    import transformers

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as trainer_module
    except ImportError as error:
        import trl

        raise SystemExit(f"TRL {trl.__version__} has no trl.experimental.ppo (removed in 1.13): {INSTALL}") from error
    from bench_online import REWARDS, _prompts, _Steps

    from rlft.models import resolve_model
    from rlft.rl.rewards import Rewards

    options = set(variant.split("+"))
    path = resolve_model(cfg.model).path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    rows = _prompts(cfg)
    encoded = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for r in rows
    ]
    policy = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    value = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype="float32")
    pad = _pad_token(tokenizer, encoded)
    if pad is None:  # TRL's own recipe: a new pad token
        tokenizer.add_special_tokens({"pad_token": "<|rlft_pad|>"})
        pad = tokenizer.pad_token_id
        policy.resize_token_embeddings(len(tokenizer))
        value.resize_token_embeddings(len(tokenizer))
    tokenizer.pad_token_id = value.config.pad_token_id = pad
    torch.nn.init.zeros_(value.score.weight)  # as rlft's zero value head: the first values are 0
    lora = dict(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear")
    if "loracritic" in options:
        value.model = peft.get_peft_model(value.model, peft.LoraConfig(**lora))
    steps = _Steps()
    reward = RuleRewardModel(
        tokenizer, encoded, rows, Rewards(REWARDS), on_scores=lambda s: steps.reward.append(float(s.mean()))
    )
    args = PPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=cfg.ppo_epochs,
        total_episodes=cfg.steps * cfg.batch_size,
        local_rollout_forward_batch_size=cfg.batch_size,
        response_length=cfg.max_new_tokens,
        stop_token="eos",
        temperature=1.0,
        missing_eos_penalty=1.0,
        kl_coef=cfg.beta,
        kl_estimator="k1",
        cliprange=0.2,
        vf_coef=0.1,
        cliprange_value=0.2,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16="bf16" in options,
        seed=cfg.seed,
        gradient_checkpointing="nogc" not in options,
    )
    dataset = datasets.Dataset.from_list([{"input_ids": ids} for ids in encoded])
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=peft.LoraConfig(**lora, task_type="CAUSAL_LM"),
    )
    # the same prompt order as rlft (TRL shuffles its rollout loader)
    trainer.dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=trainer.data_collator, drop_last=True
    )
    _time_rollouts(trainer_module, steps, tokenizer.eos_token_id)

    class Timing(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.end()

    trainer.add_callback(Timing())
    trainer.train()
    return steps.result(cfg.warmup)


def _time_rollouts(trainer_module, steps, eos: int) -> None:
    """A step begins with its generation; its rollout ends at the first forward of the trained policy-and-value."""
    generate, forward = trainer_module.batch_generation, trainer_module.forward
    state = {"in_rollout": False}

    def timed_generation(model, queries, *args, **kwargs):
        steps.begin()
        state["in_rollout"] = True
        started = time.perf_counter()
        query_responses, logits = generate(model, queries, *args, **kwargs)
        steps.generation[-1] += time.perf_counter() - started
        for response in query_responses[:, queries.shape[1] :].tolist():
            steps.tokens[-1] += response.index(eos) + 1 if eos in response else len(response)
        steps.completions[-1] += len(query_responses)
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        if state["in_rollout"] and isinstance(model, trainer_module.PolicyAndValueWrapper):
            steps.rollout[-1] += steps.elapsed()
            state["in_rollout"] = False
        return forward(model, *args, **kwargs)

    trainer_module.batch_generation, trainer_module.forward = timed_generation, timed_forward
