"""The package's layering, checked from the source: every import points down the layers, no app imports another
app, and no modules import each other in a circle (function-level imports included, since hiding an upward import
inside a function is still an upward import)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlft"

# lowest first; a module may import its own layer and the ones before it
LAYERS = [
    {
        "rlft.losses",
        "rlft.ranking_losses",
        "rlft.rl_losses",
        "rlft.ops",
        "rlft.logprobs",
        "rlft.metrics",
        "rlft.registry",
        "rlft.outputs",
        "rlft.unpaired_losses",
        "rlft.trust_region",
    },
    {"rlft.data"},
    {"rlft.models"},
    {"rlft.generation"},
    {"rlft.rl", "rlft.strategies"},
    {"rlft.methods"},
    {"rlft.eval", "rlft.callbacks", "rlft.label", "rlft.export", "rlft.serve", "rlft.tune"},
    {"rlft.cli", "rlft.pipeline"},
]

# apps sit side by side: each builds on the layers below, none on another (callbacks run evaluations)
APPS = {"rlft.eval", "rlft.serve", "rlft.callbacks", "rlft.export", "rlft.tune", "rlft.label"}
APP_IMPORTS_ALLOWED = {("rlft.callbacks", "rlft.eval")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("rlft"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("rlft"):
                found.add(base)
    found.discard(module)
    return found


def _layer(module: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    if module == "rlft" or module == "rlft.__main__":
        return len(LAYERS)
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def _app(module: str) -> str | None:
    return next((app for app in APPS if module == app or module.startswith(app + ".")), None)


def test_apps_import_no_other_app():
    crossing = [
        f"{module} imports {target} (app {_app(target)} from app {_app(module)})"
        for module, targets in _graph().items()
        for target in targets
        if _app(module)
        and _app(target)
        and _app(target) != _app(module)
        and (_app(module), _app(target)) not in APP_IMPORTS_ALLOWED
    ]
    assert not crossing, "\n".join(crossing)


def test_root_modules_are_tensor_math_only():
    roots = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert roots <= {m.removeprefix("rlft.") for m in LAYERS[0]}, sorted(roots)


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    edges = {m: {t for t in ts if t in graph and not (m.startswith(t + ".") and t in graph)} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)
