"""Environments for multi-turn online RL: what answers the model between its turns.

An environment is one object per rollout row (a fresh one for every sampled trajectory)::

    observation = env.reset(row)                 # row: the prompt record's fields (e.g. "answer", "tools")
    result = env.step(action_text)               # the model's turn, decoded, stop token excluded
    result.observation                           # messages appended before the model's next turn, or None
    result.reward, result.done, result.info      # summed into the row's environment reward; done ends it

``reset`` may return messages that replace the prompt (a task the environment draws itself) or ``None`` to keep the
record's prompt. ``step``'s observation is a list of chat messages (``{"role": "tool" | "user", "content": ...}``)
or a string, sent as one message of the environment's ``observation_role`` (default ``user``). An environment that
shows tools to the model lists their OpenAI schemas in ``tools``.

:class:`ToolEnvironment` is the one most runs need: the model calls tools (:mod:`rlft.rl.tools`) in the chat
template's tool-call format (:mod:`rlft.data.tool_calls`), each call's result comes back as a ``tool`` message, and a
turn without calls ends the episode (its text is the answer the rewards grade). Choose it from YAML with
``agent: {tools: [calculator, python]}``, or name your own class with ``agent: {environment: my_pkg.envs:Maze}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlft.data.tool_calls import parse_tool_calls
from rlft.registry import resolve
from rlft.rl.sandbox import isolation_problem, sandbox_mode
from rlft.rl.tools import Tool, resolve_tools, run_tool_calls, tool_message


@dataclass
class StepResult:
    """What the environment answers to one model turn."""

    observation: list[dict] | str | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """The interface (see the module docs). ``tools``: OpenAI tool schemas shown to the model (may be empty)."""

    tools: Sequence[dict]

    def reset(self, row: Mapping[str, Any]) -> list[dict] | None: ...

    def step(self, action: str) -> StepResult: ...


class ToolEnvironment:
    """The model calls tools until it answers without a call.

    Args:
        tools: The tools this environment offers (names, ``module:attr`` or :class:`~rlft.rl.tools.Tool`).
        tool_call_format: How calls are written (:data:`rlft.data.tool_calls.TOOL_CALL_FORMATS`).
        invalid_call_reward: Added to the environment reward for every call that cannot be read or run (e.g. a
            small negative number to teach the format); 0 by default, so the task reward alone decides.
        show_tools: List the tools in the prompt (default). ``False`` shows none: for a policy that learned its
            tools from SFT conversations without a tool list (rows without ``tools``), e.g. a tiny model whose
            context the schemas and format instructions would swamp; calls are read and run all the same.

    A row's ``tools`` field restricts the episode to those tools: tool names, or OpenAI tool schemas as in TRL's
    data format (their ``function.name`` counts).
    """

    observation_role = "tool"

    def __init__(
        self,
        tools: Sequence[str | Tool],
        tool_call_format: str = "hermes",
        invalid_call_reward: float = 0.0,
        show_tools: bool = True,
    ) -> None:
        self.available = {t.name: t for t in resolve_tools(tools)}
        if not self.available:
            raise ValueError("a ToolEnvironment needs at least one tool")
        self.format, self.invalid_call_reward, self.show_tools = tool_call_format, invalid_call_reward, show_tools
        self.offered: dict[str, Tool] = dict(self.available)

    @property
    def tools(self) -> list[dict]:
        """The schemas shown to the model (none with ``show_tools=False``)."""
        return [t.schema() for t in self.offered.values()] if self.show_tools else []

    def reset(self, row: Mapping[str, Any]) -> None:
        wanted = [_tool_name(t) for t in row.get("tools") or []]
        if wanted:
            unknown = [name for name in wanted if name not in self.available]
            if unknown:
                raise ValueError(
                    f"the row asks for tools {unknown}, which the environment does not offer "
                    f"(offered: {sorted(self.available)}); add them to `agent.tools`"
                )
            self.offered = {name: self.available[name] for name in wanted}
        return None

    def step(self, action: str) -> StepResult:
        parsed = parse_tool_calls(action, self.format)
        if not parsed.calls and not parsed.errors:  # an answer: the episode ends
            return StepResult(done=True, info={"tool_calls": 0, "invalid_tool_calls": 0})
        results = run_tool_calls(parsed.calls, self.offered)
        messages = [tool_message(r) for r in results]
        messages += [{"role": "tool", "name": "error", "content": f"error: {e}"} for e in parsed.errors]
        invalid = len(parsed.errors) + sum(not r.ok for r in results)
        return StepResult(
            observation=messages,
            reward=self.invalid_call_reward * invalid,
            info={"tool_calls": len(parsed.calls) + len(parsed.errors), "invalid_tool_calls": invalid},
        )


def _tool_name(entry) -> str:
    return entry.get("function", entry).get("name", "") if isinstance(entry, dict) else str(entry)


def environment_factory(
    environment: str | None, arguments: Mapping[str, Any], tools: Sequence[str], tool_call_format: str
):
    """A function that builds a fresh environment per row: the named class with ``arguments``, or a
    :class:`ToolEnvironment` over ``tools``. Built once here, so a typo or a bad argument fails at start."""
    if environment is not None:
        if tools:
            raise ValueError(
                "set either `agent.environment` or `agent.tools`, not both (an environment owns its tools)"
            )
        cls = resolve(environment, {}, "environment")
        cls(**arguments)  # fail now, not at the first rollout
        return lambda: cls(**arguments)
    if not tools:
        raise ValueError("an agent needs `agent.tools` (e.g. [calculator]) or an `agent.environment` class")
    args = {"tool_call_format": tool_call_format, **arguments}
    built = ToolEnvironment(tools, **args)
    if "python" in built.available and sandbox_mode() != "unsafe" and (problem := isolation_problem()):
        # every call would come back as an error and the run would quietly train against error answers
        raise ValueError(f"the python tool needs the sandbox, which cannot run here: {problem}")
    return lambda: ToolEnvironment(tools, **args)
