"""The ``rlft`` command.

``rlft fit|validate|test|predict`` is a LightningCLI over every method in :mod:`rlft.methods` and the shared
:class:`rlft.data.PreferenceDataModule`. The other subcommands are plain jsonargparse programs that live next to
the code they drive, so this file only routes to them.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable

# subcommand -> "module:function" taking argv (list[str]); imported lazily so `rlft label` does not pay for torch.
TOOL_COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("rlft.cli.models:main", "download/convert registry models (rlft models pull smollm2-135m-instruct)"),
    "generate": ("rlft.cli.generate:main", "chat with a model, adapter folder or checkpoint (streams to the terminal)"),
    "eval": ("rlft.cli.eval:main", "evaluate models: perplexity, accuracy, pass@k, lm-eval, judges, agents, reports"),
    "label": ("rlft.cli.label:run", "human preference collection: serve the labeling UI, import, export, stats"),
    "data": ("rlft.cli.data:main", "tokenise a data set once into the cache runs reuse (rlft data prepare -c CONFIG)"),
    "tune": ("rlft.cli.tune:main", "hyperparameter search with Optuna (rlft tune -c CONFIG --search S.yaml --out DIR)"),
    "pipeline": ("rlft.cli.pipeline:main", "SFT -> reward model -> DPO/GRPO/online DPO -> held-out eval -> report"),
    "export": ("rlft.cli.export:main", "ship a model: merged Hugging Face folder, GGUF (llama.cpp) or ONNX"),
    "serve": ("rlft.cli.serve:main", "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)"),
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = ["usage: rlft {fit,validate,test,predict," + ",".join(TOOL_COMMANDS) + "} ...", "", "commands:"]
    lines += [f"  {c:<10} Lightning {c} (rlft {c} -c configs/sft/tiny.yaml)" for c in LIGHTNING_COMMANDS]
    lines += [f"  {c:<10} {help_}" for c, (_, help_) in TOOL_COMMANDS.items()]
    return "\n".join(lines)


def _user_error_types() -> tuple[type[BaseException], ...]:
    # mistakes in data, settings or files: rlft raises these with a message that says what to fix
    types: list[type[BaseException]] = [
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,  # an output path that is taken (a file where a folder goes, a non-empty export folder)
        PermissionError,
        ConnectionError,
    ]
    # Lightning's own refusals of a trainer setting (e.g. `accelerator: gpu` on a machine without one)
    for name in (
        "rlft.callbacks.guard:NonFiniteError",
        "lightning.fabric.utilities.exceptions:MisconfigurationException",
    ):
        module, attr = name.split(":")
        if module in sys.modules and hasattr(sys.modules[module], attr):
            types.append(getattr(sys.modules[module], attr))
    return tuple(types)


# the tool commands' own refusals, on top of _user_error_types (a hub that cannot be reached offline is a setting
# to change, not a crash); named as "module:class" so the router imports nothing of what it routes to
_TOOL_USER_ERRORS = (
    "builtins:ConnectionError",
    "rlft.label.store:LabelError",
    "rlft.label.db:SchemaVersionError",
    "rlft.export.hub:HubOffline",
)


def _tool_user_error_types() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    for name in _TOOL_USER_ERRORS:
        module, attr = name.split(":")
        if module in sys.modules and hasattr(sys.modules[module], attr):
            extra.append(getattr(sys.modules[module], attr))
    return _user_error_types() + tuple(extra)


_COMMAND_PREFIX = re.compile(r"^rlft [\w -]+?: (error: )?")  # "rlft tune: ..." of a command's own SystemExit text


def run_tool_command(command: str, run: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run ``rlft <command>``: the one error path of every tool command.

    A user error (:func:`_user_error_types`, or a ``SystemExit`` carrying a message) prints
    ``rlft <command>: error: <one line>`` and a hint to ``--debug``, and exits 1; with ``--debug`` or
    ``RLFT_DEBUG=1`` the traceback is shown instead. Anything else is a bug and keeps its traceback.
    """
    try:
        run(argv)
    except _tool_user_error_types() as error:
        if os.environ.get("RLFT_DEBUG"):
            raise
        _exit_with(command, _one_line(error))
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):  # --help (0), a parser's usage error (2, already printed): as they are
            raise
        if os.environ.get("RLFT_DEBUG"):  # the refusal was raised `from None`: show what led to it
            exit_.__suppress_context__ = False
            traceback.print_exception(exit_)
            raise SystemExit(1) from None
        _exit_with(command, _COMMAND_PREFIX.sub("", exit_.code, count=1))


def _exit_with(command: str, message: str) -> None:
    print(f"rlft {command}: error: {' '.join(message.split()) or 'failed'}", file=sys.stderr)
    print("(run with --debug or RLFT_DEBUG=1 for the traceback)", file=sys.stderr)
    raise SystemExit(1) from None


def _one_line(error: BaseException) -> str:
    from rlft.cli.fit import condense_parser_error

    text = condense_parser_error(str(error)) if "rlft.cli.fit" in sys.modules else str(error)
    return text or type(error).__name__


# deprecation notices raised inside the libraries rlft builds on address those libraries' callers, i.e. rlft's
# maintainers, not its users (who cannot act on them); a warning attributed to rlft or user code is kept
_LIBRARIES = "transformers|peft|lightning|lightning_fabric|lightning_utilities|torch|accelerate|datasets|deepspeed"
_THIRD_PARTY = rf"({_LIBRARIES})(\.|$)"
_LIGHTNING_TIPS = "\N{ELECTRIC LIGHT BULB} Tip:"  # Lightning's advert for its cloud logger, printed at every fit


def _no_tips(record) -> bool:
    return not str(record.msg).startswith(_LIGHTNING_TIPS)


def quiet_third_party() -> None:
    """Drop the libraries' own deprecation warnings and Lightning's tips (``--debug`` keeps everything)."""
    import logging
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)  # once per logger, however often
    # bitsandbytes (imported by peft whenever installed) tries to fetch an optional CPU kernel from the Hub at import
    # and warns when it cannot, on every run; the portable fallback it then uses is correct
    for fetcher in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(fetcher).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # tracebacks for user errors, and the parser's full messages
        argv.remove("--debug")
        os.environ["RLFT_DEBUG"] = "1"
        if from_console:
            sys.argv = [sys.argv[0], *argv]
    if not os.environ.get("RLFT_DEBUG"):
        quiet_third_party()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command in TOOL_COMMANDS:
        module, func = TOOL_COMMANDS[command][0].split(":")
        run_tool_command(command, getattr(importlib.import_module(module), func), rest)
        return
    if command in LIGHTNING_COMMANDS:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from rlft.cli.fit import run_lightning_cli

        try:
            run_lightning_cli(argv)
        except SIGTERMException:  # Lightning's stop on SIGTERM is a SystemExit(None): a stopped run is no success
            raise SystemExit(128 + signal.SIGTERM) from None
        except _user_error_types() as error:
            if os.environ.get("RLFT_DEBUG"):
                raise
            print(f"rlft {command}: error: {_one_line(error)}", file=sys.stderr)
            print("(run with --debug or RLFT_DEBUG=1 for the traceback)", file=sys.stderr)
            raise SystemExit(1) from None
        return
    print(f"rlft: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    raise SystemExit(2)
