"""The README.md model card of an exported folder: Hugging Face metadata (YAML front matter) and a body that says
what was trained, from what, on which data (files with sha256 and row counts), for how many steps, to which metrics,
and how to load it.

It lives with the models (not in ``rlft.export``) because the end-of-fit export of every method writes one too, and
methods sit below the export app. It takes plain facts; the trainer-reading side is ``RLFTModule.model_card_facts``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# what the "how to load" snippet is for: the folder kinds rlft writes
USAGES = ("peft", "transformers", "sequence_classification", "rlft_reward", "onnx")
# settings worth a line of their own when a method has them (dotted hparams keys); the full set follows in a block
KEY_SETTINGS = (
    "optim.lr",
    "optim.scheduler",
    "optim.warmup_steps",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "dtype",
    "quantization",
    "beta",
    "loss_type",
    "label_smoothing",
    "kl.coef",
    "kl_coef",
    "kl.estimator",
    "head",
    "margin",
    "center_coef",
    "num_generations",
    "clip_eps",
    "max_kl",
    "desirable_weight",
    "undesirable_weight",
)
# hub ids of the registry's aliases, for `base_model` (the hub links a card to its base by id)
ALIAS_HUB_IDS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


@dataclass
class DataFile:
    """A data file a model was trained or validated on."""

    path: str
    split: str
    rows: int | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, path: str, split: str, rows: int | None) -> DataFile:
        local = Path(path)
        return cls(str(path), split, rows, file_sha256(local) if local.is_file() else None)


@dataclass
class CardFacts:
    """Everything a card says; every field but ``base_model`` and ``method`` may be left out."""

    base_model: str
    method: str
    usage: str = "transformers"
    settings: dict = field(default_factory=dict)
    data: list[DataFile] = field(default_factory=list)
    steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    license: str | None = None
    notes: list[str] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rlft_version() -> str:
    try:
        return importlib.metadata.version("rlft")
    except importlib.metadata.PackageNotFoundError:  # a source checkout: the package is imported, it is ours
        return getattr(sys.modules.get("rlft"), "__version__", "unknown")


def flatten(settings: dict, prefix: str = "") -> dict:
    """``{"lora": {"r": 8}}`` as ``{"lora.r": 8}``; only values YAML writes plainly (numbers, strings, lists)."""
    flat = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            flat[name] = list(value)
        else:
            flat[name] = str(value)
    return flat


def _hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path: how the hub names models and data sets."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not Path(text).exists()


def front_matter(facts: CardFacts) -> dict:
    base, license_ = ALIAS_HUB_IDS.get(facts.base_model, (facts.base_model, facts.license))
    if Path(base).exists():  # a local folder means nothing on the hub; its name at least says which model
        base = Path(base).name
    meta = {"base_model": base, "library_name": "peft" if facts.usage == "peft" else "transformers"}
    method_tag = re.sub(r"(?<=[a-z])(?=[A-Z])", "-", facts.method).lower()  # RewardModel -> reward-model, DPO -> dpo
    meta["tags"] = ["rlft", method_tag]
    if facts.usage in ("sequence_classification", "rlft_reward") and method_tag != "reward-model":
        meta["tags"].append("reward-model")
    datasets = sorted({d.path for d in facts.data if d.sha256 is None and _hub_id(d.path)})
    if datasets:
        meta["datasets"] = datasets
    if license_ or facts.license:
        meta["license"] = facts.license or license_
    if facts.usage == "sequence_classification":
        meta["pipeline_tag"] = "text-classification"
    return meta


def load_snippet(usage: str, folder: str = "path/to/this/folder") -> str:
    if usage == "peft":
        return (
            f"from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")'
        )
    if usage == "sequence_classification":
        return (
            f"import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
            f'model = AutoModelForSequenceClassification.from_pretrained("{folder}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{folder}")\n'
            'chat = [{"role": "user", "content": "How do I boil an egg?"},\n'
            '        {"role": "assistant", "content": "Simmer it for 8 minutes."}]\n'
            'ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)\n'
            "with torch.no_grad():\n    reward = model(**ids).logits[:, 0]  # read at the last non-pad token"
        )
    if usage == "onnx":
        return (
            f"from rlft.export import OnnxCausalLM  # onnxruntime, a decoder with KV-cache inputs/outputs\n\n"
            f'model = OnnxCausalLM("{folder}")'
        )
    if usage == "rlft_reward":
        return (
            f"from rlft.models.reward import RewardScorer\n\n"
            f'scorer = RewardScorer.from_pretrained("{folder}")\n'
            'rewards = scorer.score(["How do I boil an egg?"], ["Simmer it for 8 minutes."])'
        )
    return (
        f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{folder}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")'
    )


def _number(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def card_text(facts: CardFacts) -> str:
    """The README.md text: YAML front matter, then the body."""
    if facts.usage not in USAGES:
        raise ValueError(f"usage must be one of {USAGES}, got {facts.usage!r}")
    meta = front_matter(facts)
    if facts.method == "export":  # no training run's facts were found: say what the folder is, claim no training
        intro = f"Written by rlft {rlft_version()} from `{facts.base_model}`."
    else:
        steps = f", {facts.steps} optimiser steps." if facts.steps is not None else "."
        intro = f"Trained with rlft {rlft_version()}: **{facts.method}** starting from `{facts.base_model}`{steps}"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {facts.method} of {meta['base_model']}",
        "",
        intro,
        "",
    ]
    for note in facts.notes:
        lines += [f"> **Note:** {note}", ""]
    flat = flatten(facts.settings)
    key = {k: flat[k] for k in KEY_SETTINGS if flat.get(k) is not None}
    if key:
        lines += ["## Key settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | {_number(v)} |" for k, v in key.items()] + [""]
    if facts.data:
        lines += ["## Data", "", "| file | split | rows | sha256 |", "|---|---|---|---|"]
        lines += [
            f"| `{d.path}` | {d.split} | {d.rows if d.rows is not None else '?'} | "
            f"{'`' + d.sha256 + '`' if d.sha256 else '(hub data set or folder)'} |"
            for d in facts.data
        ]
        lines += [""]
    if facts.steps is not None or facts.metrics:
        lines += ["## Results", "", f"Steps trained: {facts.steps if facts.steps is not None else '?'}", ""]
        if facts.metrics:
            lines += ["| metric | final value |", "|---|---|"]
            lines += [f"| `{k}` | {_number(v)} |" for k, v in sorted(facts.metrics.items())] + [""]
    lines += ["## How to load", "", "```python", load_snippet(facts.usage), "```", ""]
    if flat:
        lines += [
            "<details><summary>All training settings</summary>",
            "",
            "```yaml",
            yaml.safe_dump(flat, sort_keys=True).rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, facts: CardFacts) -> Path:
    """Write ``folder/README.md`` (replacing peft's empty template card, whose ``base_model`` is a local path)."""
    path = Path(folder) / "README.md"
    path.write_text(card_text(facts))
    return path


def read_front_matter(path: str | Path) -> dict:
    """The metadata block of a card file (what the hub reads)."""
    return parse_front_matter(Path(path).read_text())


def parse_front_matter(text: str) -> dict:
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}


def trainer_card_facts(module, usage: str) -> CardFacts:
    """A card's facts from an rlft method (a LightningModule) and, when it was fitted, its trainer: the method's
    hyperparameters, the data module's files and split sizes, the steps taken and the last logged metrics."""
    hparams = dict(module.hparams)
    trainer = module._trainer
    facts = CardFacts(
        base_model=str(hparams.get("model", "unknown")),
        method=type(module).__name__,
        usage=usage,
        settings={k: v for k, v in hparams.items() if k not in ("model", "output_dir") and not k.startswith("_")},
    )
    if trainer is None:
        return facts
    facts.steps = int(trainer.global_step)
    for name, value in trainer.callback_metrics.items():
        if getattr(value, "numel", lambda: 1)() == 1:
            facts.metrics[name] = float(value)
    datamodule = getattr(trainer, "datamodule", None)
    data_hparams = getattr(datamodule, "hparams", {}) or {}
    for key, split, rows_of in (("path", "train", "train_set"), ("val_path", "validation", "val_set")):
        if data_hparams.get(key):
            rows = getattr(datamodule, rows_of, None)
            count = len(rows) if hasattr(rows, "__len__") else None  # a streamed split has no length: unknown
            facts.data.append(DataFile.of(str(data_hparams[key]), split, count))
    val_set = getattr(datamodule, "val_set", None)
    if data_hparams.get("path") and not data_hparams.get("val_path") and hasattr(val_set, "__len__") and len(val_set):
        # validation split off the training file (val_fraction): same file, its own row count
        facts.data.append(DataFile.of(str(data_hparams["path"]), "validation", len(val_set)))
    return facts
