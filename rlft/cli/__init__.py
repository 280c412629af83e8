"""The ``rlft`` command.

``rlft fit|validate|test|predict`` is a LightningCLI over every method in :mod:`rlft.methods` and the shared
:class:`rlft.data.PreferenceDataModule`. The other subcommands are plain jsonargparse programs that live next to
the code they drive, so this file only routes to them.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> "module:function" taking argv (list[str]); imported lazily so `rlft label` does not pay for torch.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("rlft.cli.models:main", "download/convert registry models (rlft models pull smollm2-135m-instruct)"),
    "generate": ("rlft.cli.generate:main", "chat with a model, adapter folder or checkpoint (streams to the terminal)"),
    "eval": ("rlft.cli.eval:main", "evaluate models: perplexity, accuracy, pass@k, lm-eval, judges, reports"),
    "label": ("rlft.cli.label:main", "human preference collection: serve the labeling UI, import, export, stats"),
    "bench": ("rlft.cli.bench:main", "throughput/memory benchmark against TRL on identical work"),
    "export": ("rlft.cli.export:main", "ship a model: merged Hugging Face folder, GGUF (llama.cpp) or ONNX"),
    "serve": ("rlft.cli.serve:main", "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = ["usage: rlft {fit,validate,test,predict," + ",".join(TOOL_COMMANDS) + "} ...", "", "commands:"]
    lines += [f"  {c:<10} Lightning {c} (rlft {c} -c configs/sft/tiny.yaml)" for c in LIGHTNING_COMMANDS]
    lines += [f"  {c:<10} {help_}" for c, (_, help_) in TOOL_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command in TOOL_COMMANDS:
        module, func = TOOL_COMMANDS[command][0].split(":")
        getattr(importlib.import_module(module), func)(rest)
        return
    if command in LIGHTNING_COMMANDS:
        from rlft.cli.fit import run_lightning_cli

        run_lightning_cli(argv)
        return
    print(f"rlft: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    raise SystemExit(2)
