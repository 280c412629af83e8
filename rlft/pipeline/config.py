"""The pipeline file: which data, which stage configs, how they are wired, where everything goes.

A pipeline YAML names ordinary ``rlft fit`` configs and a few overrides per stage; :mod:`rlft.pipeline.runner`
writes each stage's final config (paths wired to the previous stages' outputs) into the run folder and runs it::

    run_dir: runs/pipeline-tiny
    data: {paths: [rlft/assets/sample_pairs.jsonl], heldout_fraction: 0.25, seed: 0}
    stages:
      sft: {config: configs/sft/tiny.yaml, args: {trainer.max_steps: 10}}
      rm: {config: configs/rm/tiny.yaml}
      dpo: {config: configs/dpo/tiny.yaml, init: sft}
      grpo: {config: configs/grpo/tiny.yaml, init: sft, reward: rm}
      online_dpo: {config: configs/dpo/tiny.yaml, init: sft, reward: rm, rounds: 2}
    evaluation: {limit: 32, max_new_tokens: 48}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlft.cli.options import check_options

STAGE_ORDER = ("sft", "rm", "dpo", "grpo", "online_dpo")
"""Training stages in the order they run; ``evaluation`` and ``report`` follow."""


@dataclass
class DataSettings:
    """The preference pairs and their split.

    Args:
        paths: Pair files in any rlft pair format (HH-RLHF transcripts, prompt/chosen/rejected, ranked ...).
        heldout_fraction: Share of prompts held out from every training stage, for the evaluation.
        seed: Seed of the split (hash of seed and prompt).
        format: Input format, ``auto`` to detect.
    """

    paths: list[str]
    heldout_fraction: float = 0.15
    seed: int = 0
    format: str = "auto"


@dataclass
class StageSettings:
    """One training stage: an ``rlft fit`` config plus overrides.

    Args:
        config: Path of the stage's ``rlft fit`` YAML.
        args: Overrides as dotted keys, e.g. ``{trainer.max_steps: 50, model.beta: 0.2}`` (``model.X`` and
            ``data.X`` reach ``init_args``).
        init: Stage whose exported model this one starts from (its ``hf_model`` folder becomes ``model.model``).
        reward: Stage whose reward model scores rollouts / samples (GRPO, PPO, online DPO).
        rounds: Online DPO only: sample -> score -> pair -> DPO rounds.
        prompts_per_round: Online DPO only: prompts sampled each round.
        samples_per_prompt: Online DPO only: responses per prompt (the best and worst become a pair).
        max_new_tokens: Online DPO only: sampling budget.
        temperature: Online DPO only: sampling temperature.
        min_margin: Online DPO only: skip prompts whose best and worst reward differ by less.
    """

    config: str
    args: dict = field(default_factory=dict)
    init: str | None = None
    reward: str | None = None
    rounds: int = 2
    prompts_per_round: int = 32
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    min_margin: float = 0.0


@dataclass
class EvaluationSettings:
    """Held-out evaluation of every trained policy against the start (the ``init`` of the policy stages).

    Args:
        limit: Held-out prompts the policies answer.
        max_new_tokens: Answer budget.
        temperature: Sampling temperature; 1.0 makes the KL estimate unbiased (samples from the policy itself).
        batch_size: Prompts per generation batch.
        n_bootstrap: Bootstrap resamples for confidence intervals.
        toxicity: ``profanity_check`` (offline, alt-profanity-check), ``detoxify``, a Hugging Face classifier
            folder/hub id, or ``none``.
        refusal: Refusal classifier: ``rubric`` (rlft's weighted rubric) or ``regex`` (phrase list only).
        lm_eval_tasks: lm-eval tasks run on each policy (rlft's offline ones); empty to skip.
        lm_eval_limit: Documents per lm-eval task.
        seed: Sampling and bootstrap seed.
        pairs_limit: Held-out pairs the reward model is scored on (default: all).
        rm_max_length: Tokens the reward model reads per exchange (the end is kept, as in training).
    """

    limit: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    batch_size: int = 8
    n_bootstrap: int = 2000
    toxicity: str = "profanity_check"
    refusal: str = "rubric"
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = 20
    seed: int = 0
    pairs_limit: int | None = None
    rm_max_length: int = 1024


@dataclass
class PipelineConfig:
    run_dir: str
    data: DataSettings
    stages: dict[str, StageSettings]
    evaluation: EvaluationSettings | None = field(default_factory=EvaluationSettings)
    overlays: list[str] = field(default_factory=list)
    title: str = "rlft pipeline"
    source: str = ""


def set_dotted(config: dict, key: str, value) -> None:
    """Set ``a.b.c`` in a nested config; ``model.x`` / ``data.x`` go to ``init_args`` of a class_path block."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        nxt = parts[i + 1]
        if "class_path" in node and nxt not in ("class_path", "init_args"):
            node = node.setdefault("init_args", {})
    node[parts[-1]] = value


def _fail(path: str, message: str) -> None:
    raise ValueError(f"{path}: {message}")


def _build(cls, values, where: str, path: str):
    if not isinstance(values, dict):
        _fail(path, f"{where} must be a mapping, found {type(values).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        _fail(path, f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    try:
        built = cls(**values)
    except TypeError as error:  # a missing required key
        _fail(path, f"{where}: {error}")
    _check_types(built, values, where, path)
    try:
        check_options({key: values[key] for key in values}, prefix=f"{where}.")
    except ValueError as error:
        _fail(path, str(error))
    return built


_TYPES = {"int": int, "float": (int, float), "str": str, "dict": dict, "bool": bool}


def _check_types(built, values: dict, where: str, path: str) -> None:
    """Each given value has its field's type (``args: "a=b"`` or ``limit: "ten"`` would be taken as they are)."""
    for key, value in values.items():
        annotation = str(built.__dataclass_fields__[key].type)
        optional, base = annotation.endswith(" | None"), annotation.removesuffix(" | None").split("[")[0]
        expected = _TYPES.get(base, list if base == "list" else None)
        if expected is None or (value is None and optional):
            continue
        wrong_bool = isinstance(value, bool) and base in ("int", "float")
        if wrong_bool or not isinstance(value, expected):
            _fail(path, f"{where}.{key}: expected {annotation}, got {type(value).__name__} {value!r}")
        if base == "list" and not all(isinstance(item, str) for item in value):
            _fail(path, f"{where}.{key}: expected a list of strings, got {value!r}")


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and check a pipeline YAML; every error names the file and the key."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"pipeline config {path} does not exist")
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        _fail(path + line, f"not valid YAML ({getattr(error, 'problem', None) or error})")
    except UnicodeDecodeError as error:
        _fail(path, f"not UTF-8 text ({error.reason} at byte {error.start})")
    if not isinstance(raw, dict):
        _fail(path, "a pipeline config is a mapping with run_dir, data, stages")
    for key in ("run_dir", "data", "stages"):
        if key not in raw:
            _fail(path, f"missing required key {key!r}")
    unknown = sorted(set(raw) - set(PipelineConfig.__dataclass_fields__) - {"source"})
    if unknown:
        _fail(path, f"unknown top-level key(s) {unknown}")
    data = _build(DataSettings, raw["data"], "data", path)
    if not isinstance(raw["stages"], dict) or not raw["stages"]:
        _fail(path, "stages must be a non-empty mapping of stage name -> settings")
    stages = {}
    for name, values in raw["stages"].items():
        if name not in STAGE_ORDER:
            _fail(path, f"stages.{name}: unknown stage; stages are {list(STAGE_ORDER)}")
        stage = _build(StageSettings, values, f"stages.{name}", path)
        for link in ("init", "reward"):
            target = getattr(stage, link)
            if target is not None and (
                target not in raw["stages"] or STAGE_ORDER.index(target) >= STAGE_ORDER.index(name)
            ):
                _fail(path, f"stages.{name}.{link}: {target!r} must be an earlier stage of this pipeline")
        if not Path(stage.config).is_file():
            _fail(path, f"stages.{name}.config: {stage.config} does not exist")
        if name in ("grpo", "online_dpo") and stage.reward is None:
            _fail(path, f"stages.{name}.reward: name the reward-model stage (e.g. rm) that scores its samples")
        if name == "online_dpo" and (stage.rounds < 1 or stage.samples_per_prompt < 2):
            _fail(path, "stages.online_dpo: need rounds >= 1 and samples_per_prompt >= 2")
        stages[name] = stage
    evaluation = raw.get("evaluation", {})
    evaluation = None if evaluation is None else _build(EvaluationSettings, evaluation, "evaluation", path)
    if evaluation is not None and "rm" not in stages:
        _fail(path, "evaluation needs a reward-model stage (stages.rm) to score with; add one or set evaluation: null")
    return PipelineConfig(
        run_dir=raw["run_dir"],
        data=data,
        stages=dict(sorted(stages.items(), key=lambda kv: STAGE_ORDER.index(kv[0]))),
        evaluation=evaluation,
        overlays=list(raw.get("overlays", [])),
        title=raw.get("title", "rlft pipeline"),
        source=path,
    )
