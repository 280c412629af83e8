"""A tool's contract: a Python function with a JSON-schema description, and the checks its arguments pass first.

:class:`Tool` holds the function and the schema the model is shown (:meth:`Tool.schema`); calling it checks the
model's arguments against the schema before the function runs, and every failure becomes a :class:`ToolError` whose
message goes back to the model. :func:`tool` builds the schema from a function's type hints and docstring. The
built-in tools and the registry are in :mod:`rlft.rl.tools`.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace


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
