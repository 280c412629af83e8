"""The pipeline file: which data, which stage configs, how they are wired, where everything goes.

A pipeline YAML names ordinary ``rlft fit`` configs and a few overrides per stage; :mod:`rlft.pipeline.runner`
writes each stage's final config (paths wired to the previous stages' outputs) into the run folder and runs it::

    run_dir: runs/pipeline-tiny
    data: {paths: [rlft/assets/sample_pairs.jsonl], heldout_fraction: 0.25, seed: 0}
    stages:
      sft: {config: configs/sft/tiny.yaml, args: {trainer.max_steps: 10}}
      rm: {config: configs/rm/tiny.yaml}
      dpo: {config: configs/dpo/tiny.yaml, init: sft}
      dpo_rm_labels: {method: dpo, config: configs/dpo/tiny.yaml, init: sft, relabel: rm}
      grpo: {config: configs/grpo/tiny.yaml, init: sft, reward: rm}
      online_dpo: {config: configs/dpo/tiny.yaml, init: sft, reward: rm, rounds: 2}
    evaluation: {limit: 32, max_new_tokens: 48}

Stages run in file order. A stage's name is free (it names its folder); its ``method`` (default: the name) is a key
of :data:`METHODS`, which says what the pipeline does with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlft.cli.options import check_options


@dataclass(frozen=True)
class StageMethod:
    """What the pipeline does with a stage of one training method.

    Attributes:
        policy: Trains a policy that the evaluation compares with the start.
        scored: Needs a ``reward:`` stage whose reward model scores its samples.
        pairs: Trains on the split's preference pairs, so ``relabel:`` can re-order them by a reward model.
    """

    policy: bool = False
    scored: bool = False
    pairs: bool = False


METHODS: dict[str, StageMethod] = {
    "sft": StageMethod(),  # the start policy itself: the evaluation compares the others with it
    "rm": StageMethod(),
    "dpo": StageMethod(policy=True, pairs=True),
    "orpo": StageMethod(policy=True, pairs=True),
    "simpo": StageMethod(policy=True, pairs=True),
    "grpo": StageMethod(policy=True, scored=True),
    "ppo": StageMethod(policy=True, scored=True),
    "trpo": StageMethod(policy=True, scored=True),
    "online_dpo": StageMethod(policy=True, scored=True),  # the runner's own sample -> score -> DPO rounds
}
"""Training methods a stage can run; ``evaluation`` and ``report`` follow the stages."""

POLICY_METHODS = tuple(name for name, method in METHODS.items() if method.policy)

RESERVED_NAMES = ("data", "evaluation", "report")
"""Folders of the run that are not stages (a stage's name is its folder)."""
_STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
        method: A key of :data:`METHODS` (default: the stage's name), so that one pipeline can hold two stages of
            one method (``dpo`` and ``dpo_rm_labels``).
        args: Overrides as dotted keys, e.g. ``{trainer.max_steps: 50, model.beta: 0.2}`` (``model.X`` and
            ``data.X`` reach ``init_args``).
        init: Stage whose exported model this one starts from (its ``hf_model`` folder becomes ``model.model``).
        reward: Reward-model stage that scores rollouts / samples (GRPO, PPO, TRPO, online DPO).
        relabel: Pair methods only (DPO, ORPO, SimPO): reward-model stage that re-orders each training pair's
            replies before the stage trains (:mod:`rlft.pipeline.relabel`).
        rounds: Online DPO only: sample -> score -> pair -> DPO rounds.
        prompts_per_round: Online DPO only: prompts sampled each round.
        samples_per_prompt: Online DPO only: responses per prompt (the best and worst become a pair).
        max_new_tokens: Online DPO only: sampling budget.
        temperature: Online DPO only: sampling temperature.
        min_margin: Online DPO only: skip prompts whose best and worst reward differ by less.
    """

    config: str
    method: str | None = None
    args: dict = field(default_factory=dict)
    init: str | None = None
    reward: str | None = None
    relabel: str | None = None
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


def method_of(name: str, stage: StageSettings) -> str:
    """The stage's method: its ``method`` or else its name."""
    return stage.method or name


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
    stages: dict[str, StageSettings] = {}
    for name, values in raw["stages"].items():  # file order is run order: a link reaches the stages above it
        name = str(name)  # a YAML key can be a number
        stage = _build(StageSettings, values, f"stages.{name}", path)
        stages[name] = _check_stage(path, name, stage, stages, every=[str(n) for n in raw["stages"]])
    evaluation = raw.get("evaluation", {})
    evaluation = None if evaluation is None else _build(EvaluationSettings, evaluation, "evaluation", path)
    if evaluation is not None and not any(method_of(n, s) == "rm" for n, s in stages.items()):
        _fail(path, "evaluation needs a reward-model stage (method rm) to score with; add one or set evaluation: null")
    return PipelineConfig(
        run_dir=raw["run_dir"],
        data=data,
        stages=stages,
        evaluation=evaluation,
        overlays=list(raw.get("overlays", [])),
        title=raw.get("title", "rlft pipeline"),
        source=path,
    )


def _check_stage(
    path: str, name: str, stage: StageSettings, earlier: dict[str, StageSettings], *, every: list[str]
) -> StageSettings:
    """One stage against the registry and the stages above it (``earlier``; ``every``: all the file's stages)."""
    where = f"stages.{name}"
    if name in RESERVED_NAMES or not _STAGE_NAME.fullmatch(name):
        _fail(path, f"{where}: a stage name is its run folder: letters, digits, _ . - and not one of {RESERVED_NAMES}")
    method = method_of(name, stage)
    if method not in METHODS:
        what = f"unknown method {method!r}" if stage.method else f"{name!r} is not a method, so set `method:`"
        _fail(path, f"{where}: {what}; methods are {list(METHODS)}")
    for link in ("init", "reward", "relabel"):
        target = getattr(stage, link)
        if target is None:
            continue
        if target not in earlier:
            hint = "it comes later; stages run in file order" if target in every else "there is no such stage"
            _fail(path, f"{where}.{link}: {target!r} must be an earlier stage of this pipeline ({hint})")
        is_rm = method_of(target, earlier[target]) == "rm"
        if link == "init" and is_rm:
            _fail(path, f"{where}.init: {target!r} trains a reward model; init names a stage that trains a policy")
        if link != "init" and not is_rm:
            _fail(path, f"{where}.{link}: {target!r} is not a reward-model stage (method rm)")
    if not Path(stage.config).is_file():
        _fail(path, f"{where}.config: {stage.config} does not exist")
    kind = METHODS[method]
    scored = [m for m, k in METHODS.items() if k.scored]
    if kind.scored and stage.reward is None:
        _fail(path, f"{where}.reward: name the reward-model stage (e.g. rm) that scores its {method} samples")
    if not kind.scored and stage.reward is not None:
        _fail(path, f"{where}.reward: {method} scores no samples (reward is for {scored}; relabel re-orders pairs)")
    if stage.relabel is not None and not kind.pairs:
        pairs = [m for m, k in METHODS.items() if k.pairs]
        _fail(path, f"{where}.relabel: {method} does not train on the preference pairs; relabel is for {pairs}")
    if method == "online_dpo" and (stage.rounds < 1 or stage.samples_per_prompt < 2):
        _fail(path, f"{where}: need rounds >= 1 and samples_per_prompt >= 2")
    return stage
