"""The one resolver for every named choice in rlft: a registered name, or any importable object.

DPO ``loss_type``, reward-model ``head``, GRPO ``baseline``/``scale``/``loss_aggregation``, the KL estimator and
reward sources all accept either a key of their registry or a reference to your own code, so a YAML line selects
research code without touching the library::

    loss_type: my_pkg.losses:squared            # package.module:attribute
    loss_type: ./my_losses.py:squared           # a file next to the config
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def import_object(reference: str, what: str = "object") -> Any:
    """Import ``package.module:attribute`` or ``path/to/file.py:attribute``."""
    module_name, _, attribute = reference.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} {reference!r}: expected module:attribute or file.py:attribute")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise FileNotFoundError(f"{what} {reference!r}: no file {file}")
        spec = importlib.util.spec_from_file_location(f"rlft_user_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ImportError(f"{what} {reference!r}: cannot import {module_name!r} ({error})") from error
    found = getattr(module, attribute, None)
    if found is None:
        raise AttributeError(f"{what} {reference!r}: {module_name} has no attribute {attribute!r}")
    return found


def resolve(choice: str | T, registry: Mapping[str, T], what: str) -> T:
    """``registry[choice]``, else the object ``choice`` names (``module:attribute``); a non-string is returned
    as is (code may pass the function itself).

    Raises:
        ValueError: naming the registered choices when ``choice`` is neither.
    """
    if not isinstance(choice, str):
        return choice
    if choice in registry:
        return registry[choice]
    if ":" in choice:
        return import_object(choice, what)
    raise ValueError(f"unknown {what} {choice!r}; choose one of {sorted(registry)} or give module:function")
