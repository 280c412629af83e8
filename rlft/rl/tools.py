"""Tools a model may call during multi-turn RL rollouts: what they are, how they are checked and run.

A :class:`Tool` is a Python function with a JSON-schema description (what the model is shown, via
:meth:`Tool.schema`). Calling it checks the model's arguments against that schema first, and every failure (bad
arguments, an exception inside the function) becomes a :class:`ToolError` whose message goes back to the model as
the tool's answer, so one bad call costs a turn, never the training run. :func:`run_tool_calls` runs the calls parsed
from an assistant turn (:mod:`rlft.data.tool_calls`) and :func:`tool_message` turns each result into the ``tool``
message of the conversation.

Built in (:data:`TOOLS`): ``calculator`` (exact arithmetic, no ``eval``, bounded work) and ``python`` (runs the code
in the bubblewrap sandbox of :mod:`rlft.rl.sandbox`; limits set by :func:`python_tool`). A config picks tools by
name, or names your own function (it is wrapped with :func:`tool`, which reads its type hints and docstring)::

    tools: [calculator, python, my_pkg.tools:lookup]     # or ./my_tools.py:lookup

    # my_pkg/tools.py
    def lookup(word: str, limit: int = 3) -> str:
        \"\"\"Look a word up in the dictionary.

        Args:
            word: The word to look up.
            limit: How many senses to return.
        \"\"\"

:func:`register_tool` adds a tool to :data:`TOOLS` from code, so it can then be named like a built-in.
"""

from __future__ import annotations

import ast
import math
import operator
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from rlft.data.tool_calls import ToolCall
from rlft.registry import resolve
from rlft.rl.sandbox import SandboxUnavailable, run_program
from rlft.rl.tool_schema import Tool, ToolError, tool

# the contract lives in rlft.rl.tool_schema; a user imports everything about tools from here
__all__ = [
    "TOOLS",
    "Tool",
    "ToolError",
    "ToolResult",
    "calculator",
    "python_tool",
    "register_tool",
    "resolve_tools",
    "run_tool_calls",
    "tool",
    "tool_message",
]

# ---- calculator ---------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_DIGITS = 10_000  # bigger integers are refused before they are computed: `9**9**9` must not stall a rollout
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _digits(value: int) -> float:
    return math.log10(abs(value)) + 1 if value else 1  # log10 takes ints of any size


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # type(): True is not a number here
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * math.log10(abs(left)) > MAX_DIGITS:  # estimated before computing, so the work stays bounded
                raise ToolError(f"the result would have more than {MAX_DIGITS} digits")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ToolError("the result is not a real number")
        if isinstance(result, int) and _digits(result) > MAX_DIGITS:
            raise ToolError(f"the result would have more than {MAX_DIGITS} digits")  # e.g. repeated products
        return result
    shown = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
    raise ToolError(f"{shown!r} is not arithmetic; use numbers, + - * / // % ** and parentheses only")


def _int_text(value: int) -> str:
    """Exact decimal digits of any int up to MAX_DIGITS: str() alone refuses more than 4,300 digits."""
    if abs(value) < 10**4000:
        return str(value)
    high, low = divmod(abs(value), 10**4000)
    return ("-" if value < 0 else "") + _int_text(high) + str(low).zfill(4000)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly (integers of any size, decimals as floats).

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(2**64 - 1) * 3 / 7".
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is {len(expression)} characters; at most {MAX_EXPRESSION_CHARS} are taken")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as error:  # ValueError: e.g. a null byte
        raise ToolError(f"cannot read the expression: {getattr(error, 'msg', error)}") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, RecursionError, MemoryError) as error:
        raise ToolError(f"the result is too large to compute ({type(error).__name__})") from None
    return _int_text(value) if isinstance(value, int) else repr(value)


# ---- python (sandboxed) -------------------------------------------------------------------------------------------


def python_tool(
    timeout_s: float = 5, memory_mb: int = 256, max_output_bytes: int = 4096, max_processes: int = 16
) -> Tool:
    """The ``python`` tool: runs the model's code in the bubblewrap sandbox and returns what it printed.

    Args:
        timeout_s: Wall-clock limit per call (the whole process tree is killed then).
        memory_mb: Address-space limit of each process of the program.
        max_output_bytes: Most stdout (and, on failure, stderr tail) returned to the model; a program writing 16
            times this much is killed.
        max_processes: Processes the program may have at once (a fork bomb stops there).

    Raises:
        ValueError: If a limit is not positive.
    """
    if bad := {k: v for k, v in locals().items() if not v > 0}:
        raise ValueError(f"python_tool limits must be positive, got {bad}")

    def python(code: str) -> str:
        """Run a Python program in the sandbox.

        Args:
            code: The complete Python program to run.
        """
        try:
            result = run_program(
                code,
                timeout_s=timeout_s,
                memory_mb=memory_mb,
                max_output_chars=max_output_bytes,
                max_output_bytes=16 * max_output_bytes,
                max_processes=max_processes,
            )
        except SandboxUnavailable as error:  # fail closed: nothing ran; RLFT_SANDBOX=unsafe is the user's opt-in
            raise ToolError(str(error)) from None
        parts = [result.stdout.rstrip("\n")] if result.stdout.strip() else []
        if result.status != "passed" and result.stderr.strip():
            parts.append(result.stderr.strip()[-max_output_bytes:])
        if result.status == "timeout":
            parts.append(f"[timed out after {timeout_s:g} s]")
        elif result.status == "error":
            parts.append("[the sandbox could not run the program]")
        elif result.returncode and result.returncode < 0:
            parts.append(f"[killed by signal {_signal_name(-result.returncode)}]")
        elif result.returncode:
            parts.append(f"[exit status {result.returncode}]")
        return "\n".join(parts) or "[no output]"

    description = (
        f"Run a Python 3 program and return what it prints (stdout). Runs isolated: no network, no files of the "
        f"host, {timeout_s:g} s and {memory_mb} MB at most. Print the values you need."
    )
    return tool(python, description=description)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ---- registry -----------------------------------------------------------------------------------------------------

TOOLS: dict[str, Tool] = {"calculator": tool(calculator), "python": python_tool()}


def _as_tool(found, spec, name: str | None = None) -> Tool:
    if isinstance(found, Tool):
        return replace(found, name=name) if name else found
    if callable(found):
        return tool(found, name=name)
    raise ValueError(f"tool {spec!r} names a {type(found).__name__}, not a Tool or a function")


def register_tool(tool_or_name: Tool | Callable | str):
    """Add a tool to :data:`TOOLS`: ``register_tool(my_tool)``, ``@register_tool`` on a function, or
    ``@register_tool("name")``. Returns the registered :class:`Tool`.

    Raises:
        ValueError: If another tool already has the name.
    """
    if isinstance(tool_or_name, str):
        return lambda found: register_tool(_as_tool(found, tool_or_name, name=tool_or_name))
    new = _as_tool(tool_or_name, tool_or_name)
    old = TOOLS.get(new.name)
    # re-importing the module that registers a tool (a config file loaded twice) registers the same function again
    same = old is not None and _origin(old.function) == _origin(new.function)
    if old is not None and not same:
        raise ValueError(f"a tool named {new.name!r} is already registered ({_origin(old.function)}); pick another")
    TOOLS[new.name] = new
    return new


def _origin(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def resolve_tools(specs: Sequence[str | Tool | Callable] | str | Tool | Callable) -> list[Tool]:
    """Tools from a config's list: names in :data:`TOOLS`, ``module:attribute`` / ``file.py:attribute`` naming a
    Tool or a function (wrapped with :func:`tool`), Tools, or functions.

    Raises:
        ValueError: for an unknown name, something that is not a tool, or two tools with one name.
    """
    if isinstance(specs, (str, Tool)) or callable(specs):
        specs = [specs]  # `tools: calculator` in YAML means a list of one
    tools: list[Tool] = []
    for spec in specs:
        found = _as_tool(resolve(spec, TOOLS, "tool"), spec)
        if any(found.name == other.name for other in tools):
            raise ValueError(f"two tools are named {found.name!r} (from {spec!r}); each tool needs its own name")
        tools.append(found)
    return tools


# ---- running the calls of a turn ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolResult:
    """One call's outcome: ``content`` is what the model reads in the ``tool`` message; ``ok`` is False on error."""

    call: ToolCall
    content: str
    ok: bool


def run_tool_calls(calls: Sequence[ToolCall], tools: Mapping[str, Tool] | Sequence[Tool]) -> list[ToolResult]:
    """Run each call with the tool of its name, in order; failures become ``error: ...`` answers, never exceptions."""
    tools = tools if isinstance(tools, Mapping) else {t.name: t for t in tools}
    results = []
    for call in calls:
        chosen = tools.get(call.name)
        if chosen is None:
            listing = ", ".join(sorted(tools)) or "none"
            results.append(ToolResult(call, f"error: no tool named {call.name!r} (tools: {listing})", False))
            continue
        try:
            results.append(ToolResult(call, chosen(call.arguments), True))
        except ToolError as error:
            results.append(ToolResult(call, f"error: {error}", False))
    return results


def tool_message(result: ToolResult) -> dict:
    """The chat message carrying a result back to the model."""
    return {"role": "tool", "name": result.call.name, "tool_call_id": result.call.id, "content": result.content}
