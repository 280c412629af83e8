"""Evaluating a tool-using agent with the code training runs: how often it solves a task, and how it gets there.

Nothing here re-implements the agent loop. Prompt records are encoded and batched as the ``prompts`` data kind
encodes and collates them for an online run (:data:`rlft.data.kinds.DATA_KINDS`), trajectories are sampled by
:func:`rlft.rl.multiturn.collect_agent_rollout` (the same environment, tools, tool-call format, turn and token
budgets as an ``agent:`` block), and each trajectory's final answer is scored by
:func:`rlft.rl.rewards.total_reward` (the configured rewards plus the environment's reward, the sum the online
methods train on) over the fields :func:`rlft.rl.rewards.reward_fields` builds. A policy evaluated here with the
settings of its training run is graded exactly as its rollouts were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from rlft.data.collate import Collator
from rlft.data.errors import RecordError
from rlft.data.fields import parse_prompt
from rlft.data.kinds import data_kind
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.metrics import wilson_interval
from rlft.models.tokens import pad_token_id
from rlft.rl.multiturn import AgentSettings, collect_agent_rollout
from rlft.rl.rewards import Rewards, reward_fields, total_reward

# the stage reward functions see: evaluation grades like validation (a reward that only knows train/validate works)
STAGE = "validate"


@dataclass
class AgentReport:
    """What :func:`evaluate_agent` measured, over every sampled trajectory (``samples`` per prompt).

    Attributes:
        prompts: Prompt records evaluated.
        trajectories: Trajectories sampled (``prompts * samples``).
        success_threshold: A trajectory succeeds when its total reward is at least this.
        success_rate: Share of trajectories that succeeded.
        success_ci: Wilson 95 % interval of ``success_rate`` (:func:`rlft.metrics.wilson_interval`; with
            ``samples > 1`` the trajectories of one prompt are not independent and the interval is too narrow).
        mean_reward: Mean total reward (rewards + environment reward).
        mean_turns: Model turns per trajectory.
        tool_calls_per_episode: Tool calls per trajectory, invalid ones included.
        invalid_call_rate: Invalid calls / all calls (0 when no call was made): calls that could not be read or run.
        finished_rate: Share of trajectories the environment ended (the rest hit ``max_turns`` or the token budget).
        rewards: Mean of each reward source (``environment``: the environment's reward) and the metrics a source
            reported, over all trajectories.
        rows: One record per trajectory: ``prompt``, ``conversation``, ``completion`` (the final answer),
            ``reward``, ``success``, ``turns``, ``tool_calls``, ``invalid_tool_calls``, ``finished``, ``rewards``
            (each source's value), ``fields`` (the record's other fields, e.g. the reference answer), ``index``
            (the record) and ``sample``.
    """

    prompts: int
    trajectories: int
    success_threshold: float
    success_rate: float
    success_ci: tuple[float, float]
    mean_reward: float
    mean_turns: float
    tool_calls_per_episode: float
    invalid_call_rate: float
    finished_rate: float
    rewards: dict[str, float] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def metrics(self) -> dict:
        """Everything but the per-trajectory rows (what the result table shows)."""
        metrics: dict = {}
        for name, value in asdict(self).items():
            if name == "success_ci":  # two scalars, so the table shows them
                metrics["success_ci_low"], metrics["success_ci_high"] = value
            elif name != "rows":
                metrics[name] = value
        return metrics


def evaluate_agent(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    agent: AgentSettings,
    rewards: Rewards | None,
    settings: SamplingSettings,
    decoder: DecoderSettings = DecoderSettings(),
    *,
    batch_size: int = 8,
    samples: int = 1,
    success_threshold: float = 1.0,
) -> AgentReport:
    """Sample ``samples`` multi-turn trajectories for each prompt record and grade their final answers.

    Args:
        model: The policy (its tokens are sampled by ``decoder.backend``; no log-probs are computed).
        tokenizer: Its tokenizer.
        records: ``{"prompt": str | messages, **fields}`` (the ``prompts`` data kind); the fields reach the
            environment's ``reset`` and the rewards (e.g. ``answer`` for ``exact_match``, ``tools`` to restrict a
            row's tools).
        agent: Tools or environment, turn and token budgets (:class:`~rlft.rl.multiturn.AgentSettings`).
        rewards: What grades the answers; ``None`` grades by the environment's reward alone, which needs an
            ``agent.environment`` of your own (a tools-only environment rewards nothing itself).
        settings: What is sampled (``max_new_tokens`` per turn, ``temperature``, ...).
        decoder: How it is decoded (``backend``, ...).
        batch_size: Prompts sampled together (each with its ``samples`` trajectories).
        samples: Trajectories per prompt.
        success_threshold: Total reward at which a trajectory counts as solved.

    Raises:
        ValueError: No records, a record without a usable prompt (named by its index), no reward, or a setting
            out of range; a reward that needs a field the records lack.
    """
    if batch_size < 1 or samples < 1:
        raise ValueError(f"batch_size and samples must be >= 1, got {batch_size} and {samples}")
    if not records:
        raise ValueError("no prompt records to evaluate")
    if rewards is None and agent.environment is None:
        raise ValueError(
            "nothing grades the answers: a tools-only agent's environment gives no task reward; pass rewards "
            "(e.g. exact_match on the records' answer field) or an environment of your own that rewards"
        )
    agent.factory(tokenizer)  # a bad tool or environment fails before any sampling
    examples = [_encoded(tokenizer, record, index) for index, record in enumerate(records)]
    collate = Collator("prompts", pad_token_id(tokenizer))
    prompts, completions, finished, batches = [], [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        with torch.no_grad():
            rollout = collect_agent_rollout(
                model, tokenizer, batch, settings, decoder, agent, group_size=samples, score=False
            )
        prompts += rollout.prompts
        completions += rollout.completions
        finished += rollout.finished.tolist()
        batches.append(reward_fields(rollout, step=0, stage=STAGE))
    fields = _joined(batches)
    try:  # graded once over every trajectory, so a source's own metrics cover the whole evaluation
        total, parts = total_reward(rewards, prompts, completions, fields)
    except KeyError as error:  # a reward's missing field: the records' mistake, said in one line
        raise ValueError(error.args[0] if error.args else str(error)) from error
    return _report(records, prompts, completions, finished, fields, total, parts, samples, success_threshold)


def _encoded(tokenizer, record: dict, index: int) -> dict:
    """One record encoded as the ``prompts`` kind encodes it for training (a string prompt is one user turn)."""
    if not isinstance(record, dict):
        raise ValueError(f"prompt record {index}: expected an object with a 'prompt', got {type(record).__name__}")
    try:
        prompt = parse_prompt(record, "prompt")
    except RecordError as error:
        raise ValueError(f"prompt record {index}: {error}") from None
    example = data_kind("prompts").encode(
        tokenizer, {**record, "prompt": prompt}, max_length=None, max_prompt_length=None
    )
    # no length limit: the rollout renders each prompt with its tools from the messages (as in training, where
    # these ids only give the batch its shape), so a limit here would cut nothing the model sees
    example.pop("truncated")
    return example


def _joined(batches: list[dict]) -> dict:
    """The reward fields of several rollouts as one: lists concatenated (``None`` for the rows of a batch whose
    records lacked a field, as collation does within a batch), scalars (``step``, ``stage``) kept."""
    rows = [len(b["completion_ids"]) for b in batches]
    keys = dict.fromkeys(k for b in batches for k in b)
    joined: dict = {}
    for key in keys:
        values = [b.get(key) for b in batches]
        if all(isinstance(v, list) for v in values if v is not None) and any(isinstance(v, list) for v in values):
            joined[key] = [x for v, n in zip(values, rows) for x in (v if v is not None else [None] * n)]
        else:
            joined[key] = values[0]
    return joined


def _report(records, prompts, completions, finished, fields, total, parts, samples, threshold) -> AgentReport:
    n = len(completions)
    rewards = total.tolist()
    success = [r >= threshold for r in rewards]
    per_row = {name: value.tolist() for name, value in parts.items() if value.dim() == 1}
    # the definitions of training's agent/* metrics (rlft.rl.multiturn.agent_metrics), in float64 for the report
    turns, calls, invalid = (fields[k] for k in ("turns", "tool_calls", "invalid_tool_calls"))
    rows = []
    for i in range(n):
        record = records[i // samples]
        rows.append(
            {
                "index": i // samples,
                "sample": i % samples,
                "prompt": prompts[i],
                "conversation": fields["conversation"][i],
                "completion": completions[i],
                "reward": rewards[i],
                "success": success[i],
                "turns": turns[i],
                "tool_calls": calls[i],
                "invalid_tool_calls": invalid[i],
                "finished": bool(finished[i]),
                "rewards": {name: values[i] for name, values in per_row.items()},
                "fields": {k: v for k, v in record.items() if k != "prompt"},
            }
        )
    low, high = wilson_interval(sum(success), n)
    return AgentReport(
        prompts=len(records),
        trajectories=n,
        success_threshold=threshold,
        success_rate=sum(success) / n,
        success_ci=(low, high),
        mean_reward=sum(rewards) / n,
        mean_turns=sum(turns) / n,
        tool_calls_per_episode=sum(calls) / n,
        invalid_call_rate=sum(invalid) / sum(calls) if sum(calls) else 0.0,
        finished_rate=sum(map(bool, finished)) / n,
        rewards={name: float(value.float().mean()) for name, value in parts.items()},
        rows=rows,
    )
