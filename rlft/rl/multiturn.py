"""Multi-turn rollouts: the model acts, the environment answers, the model acts again, up to ``max_turns``.

Each row of the rollout is one trajectory after its prompt::

    [prompt (tools shown)] [model turn 1 ... <stop>] [tool result(s), next assistant header] [model turn 2 ...] ...
                           \\____ response_mask ___/ \\_____________ env_mask _____________/ \\_ response_mask _/

Only the model's tokens are trained (``response_mask``); the environment's tokens are attended to (``env_mask``).
The model's tokens are kept exactly as sampled, never decoded and re-encoded, so the log-probs of earlier turns are
those of the tokens the model actually produced. The environment's messages are rendered with the chat template
(the text between the model's stop token and the next generation header) and encoded once.

Turns are batched: every round samples one turn for all rows still running, each left-padded to the batch (rows
differ in how many tokens their conversation holds); a row stops when the environment says done, its turn hits the
token budget, or ``max_turns`` turns were sampled.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rlft.data.batches import PromptBatch
from rlft.data.tool_calls import tool_call_format, with_tools
from rlft.data.tool_messages import template_inputs
from rlft.generation.generator import encode_prompt_text
from rlft.generation.settings import DecoderSettings, SamplingSettings
from rlft.models.tokens import pad_token_id, stop_token_ids
from rlft.rl.environment import StepResult, environment_factory
from rlft.rl.rollout import Rollout, generate_responses, score_rollout


@dataclass(frozen=True)
class AgentSettings:
    """Multi-turn, tool-using rollouts (``agent:`` of any online method).

    Args:
        tools: Tools of a :class:`~rlft.rl.environment.ToolEnvironment` (names of :data:`rlft.rl.tools.TOOLS` or
            ``module:attr``), e.g. ``[calculator, python]``.
        environment: ``module:Class`` of your own environment instead (see :mod:`rlft.rl.environment`).
        environment_args: Keyword arguments of the environment's constructor.
        max_turns: Model turns per trajectory at most.
        max_tokens: Trajectory tokens after the prompt at most (model and environment tokens); default
            ``max_turns * sampling.max_new_tokens``. ``sampling.max_new_tokens`` bounds each turn.
        tool_call_format: ``hermes`` or ``json`` (:mod:`rlft.data.tool_calls`); default the model's own, read from its
            chat template.
        max_observation_tokens: An environment message longer than this is cut (the tokens the context grows by
            per turn stay bounded whatever a tool prints).
    """

    tools: list[str] = field(default_factory=list)
    environment: str | None = None
    environment_args: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    max_tokens: int | None = None
    tool_call_format: str | None = None
    max_observation_tokens: int = 256

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"agent.max_turns must be >= 1, got {self.max_turns}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"agent.max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_observation_tokens < 1:
            raise ValueError(f"agent.max_observation_tokens must be >= 1, got {self.max_observation_tokens}")

    def factory(self, tokenizer):
        """A function building a fresh environment per row (checked now: a bad name fails at start)."""
        fmt = self.tool_call_format or tool_call_format(tokenizer)
        return environment_factory(self.environment, self.environment_args, self.tools, fmt)


# --------------------------------------------------------------------------- rendering the environment's turns
_SENTINEL = "\ue002rlft-turn\ue003"
_CONTENT = re.compile("\ue000(\\d+)\ue001")


def observation_ids(tokenizer, messages: list[dict], stop_text: str, limit: int) -> list[int]:
    """Token ids of the environment's ``messages`` as they follow a model turn that ended with ``stop_text``: the
    template's rendering of those messages and of the next generation header. Message contents are encoded as plain
    text (a tool printing ``<|im_end|>`` cannot end a turn or open a new one) and cut at ``limit`` tokens each."""
    contents = [str(m.get("content") or "") for m in messages]
    placeholders = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    head = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(head + placeholders, tokenize=False, add_generation_prompt=True)
    segment = text[text.index(_SENTINEL) + len(_SENTINEL) :]
    if stop_text and segment.startswith(stop_text):  # the model already wrote its end of turn
        segment = segment[len(stop_text) :]
    ids: list[int] = []
    for index, piece in enumerate(_CONTENT.split(segment)):
        if not piece:
            continue
        if index % 2:  # a message's content
            content = tokenizer(contents[int(piece)], add_special_tokens=False, split_special_tokens=True)
            ids += content["input_ids"][:limit]
        else:  # the template's own text: its special tokens stay special
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def agent_prompt_ids(tokenizer, prompt, tools: Sequence[dict], fmt: str) -> list[int]:
    """A prompt's ids with the tools shown exactly as SFT shows them to this model
    (:func:`rlft.data.tool_messages.template_inputs`: the chat template's own ``tools`` support where it has one,
    else a system message listing them), so a policy warm-started by SFT on tool conversations sees the same text."""
    if isinstance(prompt, str) and tools:  # a rendered string has no place to show them: the model would never know
        raise ValueError(
            "an agent with tools needs chat prompts (a list of messages) to show its tools in; got a plain-text "
            f"prompt: {prompt[:60]!r}"
        )
    if not tools:
        return encode_prompt_text(tokenizer, prompt)
    if fmt != tool_call_format(tokenizer):  # a format the template does not know: described in a system message
        return encode_prompt_text(tokenizer, with_tools(list(prompt), tools, fmt))
    messages, extra = template_inputs(tokenizer, list(prompt), list(tools))
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- the rollout
@dataclass
class _Trajectory:
    env: Any
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    is_model: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    answer: str = ""
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    invalid_tool_calls: int = 0
    finished: bool = False  # ended by the environment (not by a budget)
    running: bool = True

    def add(self, ids: list[int], model: bool) -> None:
        self.tokens += ids
        self.is_model += [int(model)] * len(ids)


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def collect_agent_rollout(
    model: torch.nn.Module,
    tokenizer,
    batch: PromptBatch,
    settings: SamplingSettings,
    decoder: DecoderSettings,
    agent: AgentSettings,
    *,
    group_size: int = 1,
    score: bool = True,
    reference: torch.nn.Module | None = None,
    with_reference: bool = False,
    score_batch_size: int | None = None,
    share_prompts: bool = True,
) -> Rollout:
    """Sample ``group_size`` multi-turn trajectories per prompt of a ``prompts`` batch and score their tokens (see
    the module docs); the record fields reach ``env.reset`` and the rewards. Besides the record's fields, each row
    gets ``conversation`` (the trajectory's messages), ``turns``, ``tool_calls``, ``invalid_tool_calls`` and
    ``env_reward``; ``completions`` holds each trajectory's last model turn (the answer)."""
    device = next(model.parameters()).device
    make_env = agent.factory(tokenizer)
    fmt = agent.tool_call_format or tool_call_format(tokenizer)
    stops, pad_id = stop_token_ids(tokenizer, model, settings.stop_token_ids), pad_token_id(tokenizer)
    budget = agent.max_tokens or agent.max_turns * settings.max_new_tokens
    prompts = batch.prompts or [None] * len(batch)
    extra = batch.fields
    rows: list[tuple[int, Any]] = [(i, p) for i, p in enumerate(prompts) for _ in range(group_size)]
    trajectories, row_prompts = [], []
    for index, prompt in rows:
        env = make_env()
        record = {k: v[index] for k, v in extra.items()}
        replaced = env.reset({"prompt": prompt, **record})
        prompt = replaced if replaced is not None else prompt
        if prompt is None:
            ids = batch.input_ids[index][batch.attention_mask[index].bool()].tolist()
        else:
            ids = agent_prompt_ids(tokenizer, prompt, list(getattr(env, "tools", ()) or ()), fmt)
        trajectories.append(_Trajectory(env, ids))
        row_prompts.append(prompt)

    started = time.perf_counter()
    for _ in range(agent.max_turns):
        running = [t for t in trajectories if t.running]
        if not running:
            break
        room = [budget - len(t.tokens) for t in running]
        ids, mask = _left_padded([t.prompt + t.tokens for t in running], pad_id, device)
        turn = replace(settings, max_new_tokens=max(1, min(settings.max_new_tokens, max(room))))
        sampled, sampled_mask, stopped = generate_responses(model, tokenizer, ids, mask, turn, decoder)
        for t, left, row, row_mask, ended in zip(running, room, sampled, sampled_mask, stopped.tolist()):
            tokens = row[row_mask.bool()].tolist()[: min(left, settings.max_new_tokens)]
            ended = ended and bool(tokens) and tokens[-1] in stops
            t.add(tokens, model=True)
            t.turns += 1
            text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
            t.answer = text
            t.messages.append({"role": "assistant", "content": text})
            if not ended:  # cut by the token budget: no complete action to answer
                t.running = False
                continue
            result = t.env.step(text)
            result = result if isinstance(result, StepResult) else StepResult(*result)
            t.reward += float(result.reward)
            t.tool_calls += int(result.info.get("tool_calls", 0))
            t.invalid_tool_calls += int(result.info.get("invalid_tool_calls", 0))
            if result.done:
                t.finished, t.running = True, False
                continue
            observation = result.observation
            if isinstance(observation, str):
                observation = [{"role": getattr(t.env, "observation_role", "user"), "content": observation}]
            observation = list(observation or [])
            t.messages += observation
            stop_text = tokenizer.decode(tokens[-1:], skip_special_tokens=False)
            env_ids = observation_ids(tokenizer, observation, stop_text, agent.max_observation_tokens)
            if len(t.tokens) + len(env_ids) >= budget:  # no room left for another model turn
                t.running = False
                continue
            t.add(env_ids, model=False)
    elapsed = time.perf_counter() - started
    return score_rollout(
        model,
        _as_rollout(trajectories, row_prompts, extra, group_size, pad_id, device, elapsed),
        settings,
        score=score,
        reference=reference,
        with_reference=with_reference,
        score_batch_size=score_batch_size,
        group_size=group_size,
        share_prompts=share_prompts,
    )


def _as_rollout(trajectories, prompts, extra, group_size, pad_id, device, elapsed) -> Rollout:
    prompt_ids, prompt_mask = _left_padded([t.prompt for t in trajectories], pad_id, device)
    width = max(1, max(len(t.tokens) for t in trajectories))
    response_ids = torch.full((len(trajectories), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros_like(response_ids)
    env_mask = torch.zeros_like(response_ids)
    for i, t in enumerate(trajectories):
        n = len(t.tokens)
        response_ids[i, :n] = torch.tensor(t.tokens, dtype=torch.long)
        model_tokens = torch.tensor(t.is_model, dtype=torch.long)
        response_mask[i, :n], env_mask[i, :n] = model_tokens, 1 - model_tokens
    repeat = lambda values: [v for v in values for _ in range(group_size)]  # noqa: E731
    fields: dict[str, list] = {k: repeat(v) for k, v in extra.items()}
    fields.update(
        conversation=[t.messages for t in trajectories],
        turns=[t.turns for t in trajectories],
        tool_calls=[t.tool_calls for t in trajectories],
        invalid_tool_calls=[t.invalid_tool_calls for t in trajectories],
        env_reward=[t.reward for t in trajectories],
    )
    rows = len(trajectories)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids.to(device),
        response_mask=response_mask.to(device),
        env_mask=env_mask.to(device),
        completions=[t.answer for t in trajectories],
        prompts=prompts,
        fields=fields,
        finished=torch.tensor([t.finished for t in trajectories], device=device),
        generation_seconds=elapsed,
        group_ids=torch.arange(rows // group_size, device=device).repeat_interleave(group_size),
    )


def agent_metrics(fields: Mapping[str, list]) -> dict[str, torch.Tensor]:
    """Per-rollout means of what the trajectories did: turns, tool calls, the share of valid calls."""
    if "turns" not in fields:
        return {}
    calls = float(sum(fields["tool_calls"]))
    invalid = float(sum(fields["invalid_tool_calls"]))
    return {
        "turns": torch.tensor(fields["turns"], dtype=torch.float).mean(),
        "tool_calls": torch.tensor(fields["tool_calls"], dtype=torch.float).mean(),
        "tool_call_validity": torch.tensor(1.0 - invalid / calls if calls else 1.0),
        "env_reward": torch.tensor(fields["env_reward"], dtype=torch.float).mean(),
    }
