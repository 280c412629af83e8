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
import inspect
import json
import math
import operator
import re
import signal
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from rlft.data.tool_calls import ToolCall
from rlft.registry import resolve
from rlft.rl.sandbox import SandboxUnavailable, run_program


class ToolError(ValueError):
    """A tool call that could not be carried out; the message is shown to the model as the tool's answer."""


# JSON-schema type name -> the Python values that have it (bool is an int in Python, but not a JSON integer)
_JSON_CHECKS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the OpenAI function-calling API accepts as a name


def _check(value, schema: Mapping, where: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (type, enum, array items, object properties), or ``None``."""
    wanted = schema.get("type")
    if wanted is not None:
        kinds = [wanted] if isinstance(wanted, str) else list(wanted)
        if not any(_JSON_CHECKS.get(kind, lambda v: True)(value) for kind in kinds):
            return f"argument {where!r} must be {' or '.join(kinds)}, got {_json_type(value)} {_short(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"argument {where!r} must be one of {schema['enum']}, got {_short(value)}"
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            if problem := _check(item, schema["items"], f"{where}[{index}]"):
                return problem
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        return _check_object(value, schema, f"{where}.")
    return None


def _check_object(value: Mapping, schema: Mapping, prefix: str = "") -> str | None:
    properties = schema.get("properties", {})
    if unknown := [key for key in value if key not in properties]:
        return f"unknown argument {prefix + unknown[0]!r} (arguments: {', '.join(properties) or 'none'})"
    if missing := [key for key in schema.get("required", []) if key not in value]:
        return f"missing required argument {prefix + missing[0]!r}"
    for key, item in value.items():
        if problem := _check(item, properties[key], prefix + key):
            return problem
    return None


def _json_type(value) -> str:
    return next((kind for kind, fits in _JSON_CHECKS.items() if fits(value)), type(value).__name__)


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the JSON schema of its arguments.

    Attributes:
        name: What the model calls it (letters, digits, ``_`` and ``-``, at most 64).
        function: Called with the arguments as keywords; its result is turned into text.
        description: What the tool does, for the model.
        parameters: JSON schema ``{"type": "object", "properties": {...}, "required": [...]}`` of the arguments.
    """

    name: str
    function: Callable[..., str]
    description: str
    parameters: dict

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'; give name=...")
        if not callable(self.function):
            raise ValueError(f"tool {self.name!r}: function must be callable, got {type(self.function).__name__}")
        if not isinstance(self.parameters, dict) or self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema with type 'object'")

    def schema(self) -> dict:
        """The OpenAI function-tool schema, as chat templates' ``tools`` argument takes it."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __call__(self, arguments: Mapping | None = None) -> str:
        """Check ``arguments`` against :attr:`parameters`, call the function, return its result as text.

        Raises:
            ToolError: naming this tool and what is wrong (the argument, or the exception the function raised).
        """
        arguments = {} if arguments is None else arguments
        if not isinstance(arguments, Mapping):
            raise ToolError(f"tool {self.name!r}: arguments must be an object, got {_json_type(arguments)}")
        if problem := _check_object(arguments, self.parameters):
            raise ToolError(f"tool {self.name!r}: {problem}")
        try:
            result = self.function(**arguments)
        except ToolError as error:
            raise ToolError(f"tool {self.name!r}: {error}") from None
        except Exception as error:  # noqa: BLE001 -- any failure is the model's answer; no traceback (host paths)
            raise ToolError(f"tool {self.name!r} failed: {type(error).__name__}: {error}") from None
        if isinstance(result, str):
            return result
        # structured results go back as JSON, which models read more reliably than Python reprs
        return json.dumps(result, ensure_ascii=False, default=str) if isinstance(result, (dict, list)) else str(result)


# Python type hint -> JSON-schema type; typing forms (list[int], X | None, Literal) are handled in _hint_schema
_HINT_TYPES: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array"}
_HINT_TYPES |= {dict: "object", tuple: "array"}


def _hint_schema(hint, where: str) -> dict:
    if hint is inspect.Parameter.empty or hint is typing.Any:
        return {}  # no hint: any JSON value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"type": _HINT_TYPES.get(type(args[0]), "string"), "enum": list(args)}
    if origin in (typing.Union, types.UnionType):  # `X | None` also lets the model send null
        options = [_hint_schema(arg, where) for arg in args if arg is not type(None)]
        if any("type" not in option for option in options):
            return {}
        schema = dict(options[0]) if len(options) == 1 else {"type": [option["type"] for option in options]}
        if type(None) in args:
            schema["type"] = [*([schema["type"]] if isinstance(schema["type"], str) else schema["type"]), "null"]
            schema |= {"enum": [*schema["enum"], None]} if "enum" in schema else {}
        return schema
    if (origin or hint) in _HINT_TYPES:
        schema = {"type": _HINT_TYPES[origin or hint]}
        if (origin or hint) is list and args:
            schema["items"] = _hint_schema(args[0], f"{where} items")
        return schema
    raise ValueError(f"{where} has type hint {hint!r}; a tool takes str, int, float, bool, list, dict or Literal")


def _docstring(function) -> tuple[str, dict[str, str]]:
    """The first paragraph of the docstring and the Google-style ``Args:`` descriptions."""
    text = inspect.getdoc(function) or ""
    lines = text.splitlines()
    first = text.split("\n\n", 1)[0]
    summary = "" if re.match(r"\w+:\s*$", lines[0] if lines else "") else " ".join(first.split())
    found, current, indent = {}, None, None
    start = next((i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:")), None)
    for line in lines[start + 1 :] if start is not None else []:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break  # the next section (Returns:, Raises:, ...)
        indent = depth if indent is None else indent
        entry = re.match(r"\s*\**(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", line) if depth == indent else None
        if entry:
            current = entry.group(1)
            found[current] = entry.group(2).strip()
        elif current is not None:
            found[current] = f"{found[current]} {line.strip()}".strip()
    return summary, found


def tool(function: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """A :class:`Tool` from a plain function: its type hints give the argument types, parameters without a default
    are required, and its docstring gives the description (first paragraph) and each argument's (``Args:``).

    Works as ``tool(f)``, ``@tool`` and ``@tool(name="lookup")``.

    Raises:
        ValueError: naming the parameter when the function takes ``*args``/``**kwargs``, positional-only
            parameters, or a type a tool cannot take.
    """
    if function is None:
        return lambda f: tool(f, name=name, description=description)
    if isinstance(function, Tool):  # already described: only rename or re-describe it
        return replace(function, name=name or function.name, description=description or function.description)
    label = name or getattr(function, "__name__", type(function).__name__)
    try:
        hints = typing.get_type_hints(function)
    except TypeError:  # a callable object or a partial: no hints to read
        hints = {}
    summary, documented = _docstring(function)
    properties, required = {}, []
    for parameter in inspect.signature(function).parameters.values():
        where = f"tool {label!r}: parameter {parameter.name!r}"
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD, parameter.POSITIONAL_ONLY):
            raise ValueError(f"{where} cannot be passed by name; a tool is called with named arguments only")
        hint = hints.get(parameter.name, inspect.Parameter.empty)
        schema = _hint_schema(hint, where)
        if parameter.name in documented:
            schema["description"] = documented[parameter.name]
        properties[parameter.name] = schema
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(label, function, summary if description is None else description, parameters)


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
