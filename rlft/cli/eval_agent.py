"""``rlft eval agent``: a tool-using agent on a task file, sampled and graded by the rollout code training uses
(:func:`rlft.eval.agent.evaluate_agent`; a subcommand of :mod:`rlft.cli.eval`)."""

from __future__ import annotations

from rlft.cli.eval_common import finish, load_for_eval
from rlft.cli.inference import Quantization


def agent(
    model: str,
    data: str,
    tools: list[str] = [],  # noqa: B006 - shown by --help, never mutated
    environment: str | None = None,
    environment_args: dict | None = None,
    max_turns: int = 4,
    max_tokens: int | None = None,
    tool_call_format: str | None = None,
    reward: str | None = None,
    reward_field: str | None = None,
    extract: str | None = None,
    reward_options: dict | None = None,
    success_threshold: float = 1.0,
    limit: int | None = None,
    samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    backend: str = "rlft",
    batch_size: int = 8,
    seed: int = 0,
    format: str = "auto",
    out: str = "eval_results",
    device: str | None = None,
    dtype: str | None = None,
    quantization: Quantization | None = None,
) -> None:
    """Success rate, reward, turns and tool use of a tool-using agent, with the rollouts and rewards of training.

    Args:
        model: Model string.
        data: Prompt records in any rlft prompt format, e.g. JSONL rows {"prompt": ..., "answer": ...}; every other
            field reaches the environment and the reward (a row's "tools" restricts its tools).
        tools: Tools of the built-in tool environment, e.g. [calculator, python] (names or module:attr).
        environment: Your own environment as module:Class instead of tools (it may reward by itself).
        environment_args: Keyword arguments of the environment (or of the tool environment, e.g.
            {invalid_call_reward: -0.1}).
        max_turns: Model turns per trajectory at most.
        max_tokens: Trajectory tokens after the prompt at most (default max_turns * max_new_tokens).
        tool_call_format: hermes or json (default: the model's own, read from its chat template).
        reward: Reward source grading the final answer: exact_match, regex, length, code_tests, reward_model or
            module:function (as in a training config's `rewards`). Required with --tools.
        reward_field: exact_match: the record field with the reference answer (default answer).
        extract: exact_match: how the answer is read from the final turn: last_number (default), full, boxed,
            answer_tag or a regex.
        reward_options: Further options of the reward source, e.g. {pattern: '^\\d+$'} for regex.
        success_threshold: A trajectory succeeds when its total reward (reward + environment reward) is at least
            this.
        limit: Use only the first N records.
        samples: Trajectories per prompt (use temperature > 0 when > 1).
        max_new_tokens: Tokens per model turn at most.
        temperature: Sampling temperature (0 = greedy).
        top_p: Nucleus sampling mass.
        backend: Sampler: rlft, hf, vllm or module:function (a registered backend, as in `decoder.backend`).
        batch_size: Prompts sampled together.
        seed: Sampling seed.
        format: Input format name, or "auto" to detect it.
        out: Output folder (writes agent.json and agent.md).
        device: Where models run: cuda, cuda:N or cpu (default: cuda when available).
        dtype: Weights dtype: float32, bfloat16, float16 or auto (default: bfloat16 on CUDA, float32 on CPU).
        quantization: Load weights in 4bit or 8bit through bitsandbytes (CUDA only).
    """
    import torch

    from rlft.eval.agent import evaluate_agent
    from rlft.eval.data import load_records
    from rlft.eval.results import make_result
    from rlft.generation.settings import DecoderSettings, SamplingSettings
    from rlft.rl.multiturn import AgentSettings
    from rlft.rl.tools import resolve_tools

    # every setting is checked before the model loads: a typo costs no loading time
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0)
    decoder = DecoderSettings(backend=backend)
    agent_settings = AgentSettings(
        tools=list(tools),
        environment=environment,
        environment_args=dict(environment_args or {}),
        max_turns=max_turns,
        max_tokens=max_tokens,
        tool_call_format=tool_call_format,
    )
    resolve_tools(tools)  # an unknown tool name fails here, naming the known ones
    if not tools and environment is None:
        raise ValueError("give the agent tools (--tools '[calculator]') or an environment (--environment module:Class)")
    rewards = _rewards(reward, reward_field, extract, reward_options)
    if rewards is None and environment is None:
        raise ValueError(
            "nothing grades the answers: the tool environment gives no task reward; pass --reward (e.g. "
            "--reward exact_match --reward_field answer --extract last_number)"
        )
    records = load_records(data, kind="prompts", format=format, limit=limit, on_invalid="error")
    if rewards is not None and reward == "exact_match":
        _check_field(records, reward_field or "answer", data)
    lm, tok = load_for_eval(model, device, dtype, quantization)
    torch.manual_seed(seed)
    report = evaluate_agent(
        lm,
        tok,
        records,
        agent_settings,
        rewards,
        settings,
        decoder,
        batch_size=batch_size,
        samples=samples,
        success_threshold=success_threshold,
    )
    config = {
        "data": data,
        "limit": limit,
        "tools": list(tools),
        "environment": environment,
        "environment_args": environment_args,
        "max_turns": max_turns,
        "max_tokens": max_tokens,
        "reward": reward,
        "reward_options": _options(reward, reward_field, extract, reward_options) if reward else None,
        "samples": samples,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "backend": backend,
        "seed": seed,
    }
    finish(make_result("agent", model, report.metrics(), config=config, details={"rows": report.rows}), out)


def _options(reward: str, reward_field: str | None, extract: str | None, options: dict | None) -> dict:
    """The reward source's options: exact_match reads --reward_field and --extract; other sources take
    --reward_options only (a flag they would ignore is refused, not dropped)."""
    if reward == "exact_match":
        return {"field": reward_field or "answer", "extract": extract or "last_number", **(options or {})}
    if reward_field is not None or extract is not None:
        raise ValueError(
            f"--reward_field and --extract are options of exact_match, not of --reward {reward}; "
            "pass the source's options as --reward_options '{...}'"
        )
    return dict(options or {})


def _rewards(reward: str | None, reward_field: str | None, extract: str | None, options: dict | None):
    from rlft.rl.rewards import Rewards, RewardSpec

    if reward is None:
        if reward_field is not None or extract is not None or options:
            raise ValueError("--reward_field, --extract and --reward_options need --reward (e.g. exact_match)")
        return None
    try:
        return Rewards([RewardSpec(source=reward, options=_options(reward, reward_field, extract, options))])
    except TypeError as error:  # a bad option name of the source: a setting to fix, said in one line
        raise ValueError(str(error)) from error


def _check_field(records: list[dict], name: str, data: str) -> None:
    """Every record carries the reference exact_match reads (found before sampling, not after)."""
    missing = [index for index, record in enumerate(records) if name not in record]
    if missing:
        raise ValueError(
            f"{data}: exact_match reads the field {name!r}, which {len(missing)} of {len(records)} records lack "
            f"(e.g. record {missing[0]}, fields {sorted(records[missing[0]])}); set --reward_field"
        )
