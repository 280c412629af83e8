"""One range table for the options every command shares by name, and the checks that fail before any work.

``rlft generate``, every ``rlft eval`` subcommand and the pipeline file take options such as ``--limit``,
``--temperature`` or ``--seed``; each name means the same everywhere, so one table says what each accepts and
:func:`check_options` refuses a value outside it with one line (``--top_p must be in (0, 1], got 2.0``), which the
``rlft`` router prints (:func:`rlft.cli.run_tool_command`). :func:`prepare_out_dir` and :func:`check_listen` refuse an
output folder or a listening address that cannot be used before a model is loaded or an evaluation has run.
"""

from __future__ import annotations

import functools
import inspect
import math
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed and numpy take (as rlft serve's request limit)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: float, optional: bool = False) -> Callable[[Any], bool]:
    return lambda v: (optional and v is None) or (_number(v) and v >= low)


def _above(low: float, optional: bool = False) -> Callable[[Any], bool]:
    return lambda v: (optional and v is None) or (_number(v) and v > low)


# option name -> (accepts, what it must be); an option that is absent or not in the table is not checked here
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "limit": (_above(0, optional=True), "> 0 (or unset for all)"),
    "batch_size": (_at_least(1), ">= 1"),
    "max_new_tokens": (_at_least(1), ">= 1"),
    "max_tokens": (_at_least(1, optional=True), ">= 1"),
    "max_length": (_at_least(2, optional=True), ">= 2"),
    "stride": (_at_least(1, optional=True), ">= 1"),
    "temperature": (_at_least(0), "a finite number >= 0 (0 = greedy)"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "in (0, 1]"),
    "seed": (lambda v: v is None or (isinstance(v, int) and 0 <= v <= SEED_MAX), f"an integer in [0, {SEED_MAX}]"),
    "n": (_at_least(1), ">= 1"),
    "samples": (_at_least(1), ">= 1"),
    "n_bootstrap": (_at_least(1), ">= 1"),
    "workers": (_at_least(1, optional=True), ">= 1"),
    "max_turns": (_at_least(1), ">= 1"),
    "num_fewshot": (_at_least(0, optional=True), ">= 0"),
    "timeout_s": (_above(0), "> 0"),
    "memory_mb": (_at_least(1), ">= 1"),
    "success_threshold": (lambda v: _number(v), "a finite number"),
    # the pipeline file's own names
    "heldout_fraction": (lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    "lm_eval_limit": (_at_least(1, optional=True), ">= 1"),
    "pairs_limit": (_at_least(1, optional=True), ">= 1"),
    "rm_max_length": (_at_least(2), ">= 2"),
    "rounds": (_at_least(1), ">= 1"),
    "prompts_per_round": (_at_least(1), ">= 1"),
    "samples_per_prompt": (_at_least(2), ">= 2 (the best and the worst become a pair)"),
    "min_margin": (_at_least(0), "a finite number >= 0"),
}


def check_options(values: Mapping[str, Any], prefix: str = "--", names: Mapping[str, str] | None = None) -> None:
    """Refuse the first value of ``values`` outside :data:`RANGES` (``names`` maps an option to its table entry)."""
    for option, value in values.items():
        rule = RANGES.get((names or {}).get(option, option))
        if rule is not None and not rule[0](value):
            raise ValueError(f"{prefix}{option} must be {rule[1]}, got {value!r}")


def prepare_out_dir(out: str | Path, flag: str = "--out") -> Path:
    """Create the output folder now (not after an hour of evaluation), or say in one line why it cannot be."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {out}: is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag} {out}: cannot create the folder ({error.strerror or error})") from None
    return path


def checked(function: Callable) -> Callable:
    """Check a command function's arguments against :data:`RANGES` and create its ``out`` folder, then call it."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        check_options(bound.arguments)
        if isinstance(bound.arguments.get("out"), str):
            prepare_out_dir(bound.arguments["out"])
        return function(*args, **kwargs)

    return wrapper


def check_listen(host: str, port: int) -> None:
    """Refuse a port outside 0-65535, a host that does not resolve, or an address already in use, before a model or
    database is opened (the server would fail only after loading, with the server library's traceback)."""
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0-65535, got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(f"--host {host}: not an address this machine can listen on ({error})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as error:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None
