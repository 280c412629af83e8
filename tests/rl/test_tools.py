"""The tool registry for multi-turn RL: schemas read from functions, argument checking, the exact and bounded
calculator, resolving tools from config names, running a turn's calls, and the sandbox's guarantees holding through
the ``python`` tool (hostile code: network, host files, memory and fork bombs, endless loops, output floods)."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Literal

import pytest

from rlft.data.tool_calls import ToolCall
from rlft.rl import sandbox
from rlft.rl import tools as tools_module
from rlft.rl.sandbox import isolation_problem
from rlft.rl.tools import (
    TOOLS,
    Tool,
    ToolError,
    ToolResult,
    calculator,
    python_tool,
    register_tool,
    resolve_tools,
    run_tool_calls,
    tool,
    tool_message,
)

IN_CI = os.environ.get("CI", "").lower() == "true"


def lookup(word: str, limit: int = 3, exact: bool = False, tags: list[str] | None = None) -> str:
    """Look a word up in the dictionary.

    Returns its senses, most common first.

    Args:
        word: The word to look up.
        limit (int): How many senses to return,
            counting from the most common.
        exact: Match the spelling exactly.
        tags: Only senses with these tags.

    Returns:
        The senses, one a line.
    """
    return "\n".join([f"{word}: sense {i + 1}" for i in range(limit)])


def test_schema_is_read_from_type_hints_and_the_docstring():
    built = tool(lookup)
    assert built.name == "lookup" and built({"word": "tea", "limit": 2}) == "tea: sense 1\ntea: sense 2"
    assert built.schema() == {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up in the dictionary.",
            "parameters": {
                "type": "object",
                "properties": {
                    "word": {"type": "string", "description": "The word to look up."},
                    "limit": {
                        "type": "integer",
                        "description": "How many senses to return, counting from the most common.",
                    },
                    "exact": {"type": "boolean", "description": "Match the spelling exactly."},
                    "tags": {
                        "type": ["array", "null"],
                        "items": {"type": "string"},
                        "description": "Only senses with these tags.",
                    },
                },
                "required": ["word"],
            },
        },
    }


def test_decorator_forms_and_the_types_a_tool_cannot_take():
    @tool
    def scale(x: float, factor: int, mode: Literal["up", "down"] = "up", data: dict | None = None) -> float:
        """Scale a number."""
        return x * factor

    assert isinstance(scale, Tool) and scale({"x": 1.5, "factor": 2}) == "3.0"
    assert scale.parameters["properties"]["x"] == {"type": "number"}
    assert scale.parameters["properties"]["mode"] == {"type": "string", "enum": ["up", "down"]}
    assert scale.parameters["properties"]["data"] == {"type": ["object", "null"]}

    @tool(name="greet", description="Say hello.")
    def hello(who: str) -> str:
        return f"hello {who}"

    assert hello.name == "greet" and hello.description == "Say hello." and hello({"who": "ann"}) == "hello ann"
    assert tool(hello, name="hi").name == "hi" and tool(hello, name="hi").parameters == hello.parameters
    with pytest.raises(ValueError, match="'<lambda>'.*name="):
        tool(lambda x: x)
    with pytest.raises(ValueError, match=r"parameter 'rest'.*named arguments"):
        tool(lambda *rest: rest, name="spread")
    with pytest.raises(ValueError, match=r"parameter 'when'.*type hint"):

        @tool
        def stamp(when: socket.socket) -> str:
            return ""


def test_arguments_are_checked_before_the_function_runs():
    seen = []

    @tool
    def record(text: str, count: int, ratio: float = 1.0, items: list[int] | None = None) -> str:
        """Record a call."""
        seen.append(text)
        return "ok"

    bad = {
        "missing required argument 'count'": {"text": "a"},
        "unknown argument 'colour'": {"text": "a", "count": 1, "colour": "red"},
        "argument 'text' must be string, got integer 5": {"text": 5, "count": 1},
        "argument 'count' must be integer, got boolean true": {"text": "a", "count": True},
        "argument 'count' must be integer, got number 1.5": {"text": "a", "count": 1.5},
        "argument 'items[1]' must be integer, got string": {"text": "a", "count": 1, "items": [1, "2"]},
        "arguments must be an object": ["a", 1],
    }
    for message, arguments in bad.items():
        with pytest.raises(ToolError, match=re.escape(f"tool 'record': {message}")):
            record(arguments)
    assert seen == []  # none of them reached the function
    assert record({"text": "a", "count": 1, "ratio": 2}) == "ok"  # an integer is a number


def test_failures_inside_a_tool_become_tool_errors_without_a_traceback():
    def broken(path: str) -> str:
        return open(path).read()

    with pytest.raises(ToolError) as caught:
        tool(broken)({"path": "/no/such/file"})
    message = str(caught.value)
    assert message.startswith("tool 'broken' failed: FileNotFoundError:") and "/no/such/file" in message
    assert "Traceback" not in message and __file__ not in message
    assert tool(lambda n: {"n": n, "sq": n * n}, name="square")({"n": 3}) == '{"n": 3, "sq": 9}'


@pytest.fixture
def unlimited_int_text():
    """Python refuses int <-> str past 4,300 digits by default; the test's own comparison needs more."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    yield
    sys.set_int_max_str_digits(limit)


def test_calculator_is_exact_and_follows_python_arithmetic(unlimited_int_text):
    calc = TOOLS["calculator"]
    assert calc({"expression": "123456789123456789 * 987654321987654321"}) == str(
        123456789123456789 * 987654321987654321
    )
    cases = ["2**100 - 1", "-(3 + 4) * 2", "7 // 2", "-7 % 3", "1 / 4", "2 ** -2", "+5 - -5", "1.5e3 * 2", "10**30 / 3"]
    for expression in cases:
        assert calc({"expression": expression}) == repr(eval(expression)), expression
    big = calc({"expression": "3**12000"})  # 5,726 digits: past str()'s own 4,300-digit default
    assert int(big) == 3**12000


def test_calculator_refuses_everything_but_arithmetic():
    for expression in ["__import__('os')", "x + 1", "(1).real", "abs(-1)", "True + 1", "1j", "[1, 2]", "'a' * 3"]:
        with pytest.raises(ToolError, match="is not arithmetic"):
            calculator(expression)
    for expression in ["1 / 0", "1 // 0", "5 % 0", "1.0 / 0"]:
        with pytest.raises(ToolError, match="division by zero"):
            calculator(expression)
    for expression in ["2 +", "import os", "1; 2"]:
        with pytest.raises(ToolError, match="cannot read"):
            calculator(expression)
    with pytest.raises(ToolError, match="not a real number"):
        calculator("(-8) ** 0.5")


def test_calculator_work_is_bounded():
    start = time.monotonic()
    for expression in ["9**9**9", "10**5000 * 10**5000", "(10**4000)**3", "2**(2**40)", "-(7**99999)"]:
        with pytest.raises(ToolError, match="more than 10000 digits"):
            calculator(expression)
    with pytest.raises(ToolError, match="too large"):
        calculator("2.0 ** 10**400")
    with pytest.raises(ToolError, match="at most 500"):
        calculator("1+" * 300 + "1")
    with pytest.raises(ToolError):
        calculator("(" * 300 + "1" + ")" * 300)  # deeper than the parser takes: refused, not a crash
    assert time.monotonic() - start < 1.0


def test_resolve_tools_takes_names_references_tools_and_functions(tmp_path, monkeypatch):
    (tmp_path / "my_user_tools.py").write_text(
        "def shout(text: str) -> str:\n"
        '    """Upper-case some text.\n\n    Args:\n        text: What to shout.\n    """\n'
        "    return text.upper()\n"
        "NOT_A_TOOL = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = tool(lookup, name="dictionary")
    found = resolve_tools(["calculator", "my_user_tools:shout"])
    assert [t.name for t in found] == ["calculator", "shout"] and found[1]({"text": "hi"}) == "HI"
    assert found[1].parameters["properties"]["text"]["description"] == "What to shout."
    from_file = resolve_tools([f"{tmp_path}/my_user_tools.py:shout", own, "python"])
    assert [t.name for t in from_file] == ["shout", "dictionary", "python"] and from_file[1] is own
    assert [t.name for t in resolve_tools("calculator")] == ["calculator"]  # `tools: calculator` is a list of one
    with pytest.raises(ValueError, match="two tools are named 'shout'"):
        resolve_tools(["my_user_tools:shout", f"{tmp_path}/my_user_tools.py:shout"])
    with pytest.raises(ValueError, match="two tools are named 'calculator'"):
        resolve_tools(["calculator", tool(calculator)])
    with pytest.raises(ValueError, match=r"unknown tool 'calcualtor'.*calculator"):
        resolve_tools(["calcualtor"])
    with pytest.raises(ValueError, match="names a int, not a Tool"):
        resolve_tools(["my_user_tools:NOT_A_TOOL"])


def test_register_tool_adds_a_name_and_refuses_a_clash(monkeypatch):
    monkeypatch.setattr(tools_module, "TOOLS", dict(TOOLS))

    @register_tool
    def shout(text: str) -> str:
        return text.upper()

    register_tool("dictionary")(lookup)
    assert [t.name for t in resolve_tools(["shout", "dictionary"])] == ["shout", "dictionary"]
    assert register_tool(shout).name == "shout"  # the same function again (a module imported twice) is fine
    with pytest.raises(ValueError, match="'calculator' is already registered"):
        register_tool("calculator")(lambda expression: expression)
    assert "shout" not in TOOLS  # the module-level registry was not touched by this test


def test_run_tool_calls_answers_every_call():
    available = {t.name: t for t in resolve_tools(["calculator", tool(lookup)])}
    calls = [
        ToolCall("calculator", {"expression": "6 * 7"}, "call_0"),
        ToolCall("search", {"query": "x"}, "call_1"),
        ToolCall("calculator", {"expr": "1"}, "call_2"),
        ToolCall("calculator", {"expression": "1 / 0"}, "call_3"),
    ]
    results = run_tool_calls(calls, available)
    assert results[0] == ToolResult(calls[0], "42", True)
    assert results[1] == ToolResult(calls[1], "error: no tool named 'search' (tools: calculator, lookup)", False)
    assert not results[2].ok and results[2].content.startswith("error: tool 'calculator': unknown argument 'expr'")
    assert results[3].content == "error: tool 'calculator': division by zero" and not results[3].ok
    assert tool_message(results[0]) == {"role": "tool", "name": "calculator", "tool_call_id": "call_0", "content": "42"}
    assert run_tool_calls(calls[:1], list(available.values()))[0].content == "42"


def test_python_tool_refuses_to_run_without_the_sandbox(tmp_path, monkeypatch):
    marker = tmp_path / "ran.txt"
    code = f"open({str(marker)!r}, 'w').write('ran'); print('ran')"
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("RLFT_SANDBOX", raising=False)
    sandbox.isolation_problem.cache_clear()
    try:
        with pytest.raises(ToolError, match=r"tool 'python': .*Nothing was run.*RLFT_SANDBOX=unsafe"):
            TOOLS["python"]({"code": code})
        assert not marker.exists()
        monkeypatch.setenv("RLFT_SANDBOX", "unsafe")  # the user's explicit opt-in, as for the sandbox itself
        assert TOOLS["python"]({"code": code}) == "ran" and marker.exists()
    finally:
        sandbox.isolation_problem.cache_clear()
    with pytest.raises(ValueError, match="must be positive"):
        python_tool(timeout_s=0)


@pytest.fixture
def isolated():
    problem = isolation_problem()
    if problem and IN_CI:
        pytest.fail(f"CI=true but the sandbox is unavailable: {problem}")
    if problem:
        pytest.skip(f"sandbox unavailable: {problem}")


def _host_processes_with(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_python_tool_runs_code_and_reports_failures(isolated):
    python = TOOLS["python"]
    assert python({"code": "print(sum(i * i for i in range(10)))"}) == "285"
    assert python({"code": "x = 1"}) == "[no output]"
    failed = python({"code": "print('before')\nraise ValueError('bad input')"})
    assert failed.startswith("before\n") and "ValueError: bad input" in failed and failed.endswith("[exit status 1]")
    assert python({"code": "import sys; sys.exit(4)"}) == "[exit status 4]"
    start = time.monotonic()
    looping = python_tool(timeout_s=1)({"code": "print('started', flush=True)\nwhile True:\n    pass"})
    assert looping == "started\n[timed out after 1 s]" and time.monotonic() - start < 5
    flood = python_tool(max_output_bytes=1000)({"code": "while True:\n    print('x' * 1000)"})
    assert len(flood) < 2500 and "output limit" in flood


def test_python_tool_keeps_the_sandbox_guarantees(isolated, tmp_path):
    python = TOOLS["python"]
    memory = python({"code": "x = bytearray(2 * 1024 ** 3)\nprint('allocated')"})
    assert "MemoryError" in memory and "allocated" not in memory
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    for path in ("/etc/passwd", str(secret), os.path.expanduser("~/.bashrc")):
        answer = python({"code": f"print(open({path!r}).read())"})
        assert "FileNotFoundError" in answer or "PermissionError" in answer, path
        assert "host secret" not in answer and "root:" not in answer, path
    home = Path.home()
    listing = python({"code": f"import os; print(sorted(os.listdir({str(home)!r})))"})
    # the interpreter's own (read-only) tree may live under the home folder; nothing else of it is there
    interpreter = Path(os.path.realpath(sys.executable))
    allowed = {interpreter.relative_to(home).parts[0]} if interpreter.is_relative_to(home) else set()
    assert "FileNotFoundError" in listing or set(eval(listing)) <= allowed, listing
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('in')"
    network = python({"code": connect})
    assert "[exit status 1]" in network and "in\n" not in network
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()


def test_python_tool_contains_a_fork_bomb(isolated):
    marker = f"rlft-tool-bomb-{time.time_ns()}"
    bomb = (
        "import os, sys, time\n"
        "made = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        f"            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(100)', '{marker}'])\n"
        "        made += 1\n"
        "except OSError as error:\n"
        "    print(made, error.errno, flush=True)\n"
        "time.sleep(100)\n"
    )
    answer = python_tool(timeout_s=3, max_processes=8)({"code": bomb})
    assert answer.endswith("[timed out after 3 s]") and int(answer.split()[0]) <= 8
    time.sleep(0.5)
    assert _host_processes_with(marker) == []
    assert TOOLS["python"]({"code": "print('alive')"}) == "alive"
