"""``rlft fit|validate|test|predict``: LightningCLI over every rlft method and the shared data module.

Two things differ from a plain LightningCLI, both so that settings cannot lie:

* ``--ckpt_path FILE`` does not replace the command line with the checkpoint's saved settings (Lightning's own
  behaviour): what the user passes wins. Settings that cannot change on resume (method, base model, LoRA shape,
  quantization) must match the checkpoint, or the run stops with a message naming them.
* ``--ckpt_path last`` with nothing to resume is an error; ``--ckpt_path last_or_fresh`` resumes when there is a
  ``last.ckpt`` and starts fresh otherwise.

Every run also claims its export folder (``<output_dir>/rlft_run.json``), so a run never writes into a folder that
another run exported to.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from pathlib import Path

import transformers
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rlft.callbacks.guard import NonFiniteGuard, refuse_impossible_settings
from rlft.callbacks.monitors import RunMonitor
from rlft.callbacks.progress import ProgressLine
from rlft.callbacks.resume import ResumeLogContinuity
from rlft.callbacks.shutdown import GracefulShutdown, bound_collectives
from rlft.cli.config_logging import TrackedConfigCallback
from rlft.cli.trainer import Trainer
from rlft.data import PreferenceDataModule
from rlft.methods.base import RLFTModule
from rlft.methods.exporting import export_folder

LAST_OR_FRESH = "last_or_fresh"
# settings that shape the trainable tensors or what they mean: a resume that changes them cannot be exact
FIXED_ON_RESUME = ("model", "lora", "quantization")
# optimiser settings baked into the restored schedule: changing them on resume would silently not apply
FIXED_OPTIM_ON_RESUME = ("scheduler", "warmup_steps", "warmup_ratio", "min_lr_ratio")
# data settings that define the order a resume continues: change them and it would skip the wrong batches
FIXED_DATA_ON_RESUME = ("path", "format", "batch_size", "seed", "shuffle", "val_fraction", "limit", "packing")
RUN_MARKER = "rlft_run.json"
# the trainer settings every run starts from: configs/trainer/default.yaml (linked into the package)
TRAINER_DEFAULTS = Path(__file__).resolve().parents[1] / "assets" / "trainer_default.yaml"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run (unreadable, another method or model, nothing to resume)."""


class ConfigError(ValueError):
    """Settings that contradict each other or the files on disk."""


def condense_parser_error(message: str) -> str:
    """Reduce jsonargparse's "Does not validate against any of the Union subtypes" dump to the real causes."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    items: list[str] = []
    in_errors = False
    for line in message.splitlines():
        text = line.strip()
        if text.startswith("Errors:"):
            in_errors = True
        elif text.startswith("- "):
            items.append(text[2:].strip())
        elif in_errors and items and line.startswith("    ") and text:
            # an item's cause continues on indented lines ("Problem with given class_path ...:" then the reason)
            items[-1] = f"{items[-1].rstrip(':')}: {text}" if items[-1].endswith(":") else f"{items[-1]} {text}"
        elif not line.startswith(" "):
            in_errors = False
    causes = []
    for text in items:
        if (
            "Expected a <class 'NoneType'>" in text
            or "Does not validate against" in text
            or text.startswith("Subtypes:")
        ):
            continue
        if text not in causes:
            causes.append(text)
    head = message.split("\n", 1)[0]
    head = head.split("Does not validate")[0].rstrip(" :")
    body = "; ".join(causes) if causes else message.splitlines()[0]
    return f"{head}: {body}" if head else body


def misplaced_decoder_key(message: str) -> str | None:
    """The one-line fix for a decoder setting written under ``sampling:`` (e.g. ``decode_dtype``), else None."""
    from rlft.generation.settings import DECODER_KEYS, misplaced_message

    said = re.search(r"sampling\.[\w., ]+? (?:is a|are) decoder settings?: [^\n]*", message)  # a nested parser's
    if said:
        return said.group(0)
    found = re.search(r"'sampling' does not accept option '([\w.]+)'", message) or re.search(
        r"unrecognized arguments: .*?--(?:[\w.]*\.)?sampling\.(\w+)", message
    )
    key = found.group(1).rsplit(".", 1)[-1] if found else None
    return misplaced_message([key]) if key in DECODER_KEYS else None


class RLFTArgumentParser(LightningArgumentParser):
    """Parser whose errors are one readable line instead of a union dump plus the whole config."""

    def error(self, message: str, ex: Exception | None = None):
        misplaced = misplaced_decoder_key(message)
        if misplaced is not None:  # main() prints it as `rlft fit: error: <line>`, exits 1
            raise ConfigError(misplaced)
        if os.environ.get("RLFT_DEBUG"):
            return super().error(message, ex)
        self.print_usage(sys.stderr)
        sys.stderr.write(f"rlft: error: {condense_parser_error(message)}\n")
        raise SystemExit(2)


def _sharded_checkpoint_header(folder: Path) -> dict:
    """The Lightning state of a folder of shards: FSDP2's ``meta.pt``, or the model-states file DeepSpeed writes
    the client state into (``<tag>/[zero_pp_rank_0_]mp_rank_00_model_states.pt``)."""
    import torch

    names = ("meta.pt", "*/mp_rank_00_model_states.pt", "*/zero_pp_rank_0_mp_rank_00_model_states.pt")
    for pattern in names:
        for candidate in sorted(folder.glob(pattern)):
            try:  # our own DeepSpeed/torch files (DeepSpeed stores its config objects: not weights-only)
                return torch.load(candidate, map_location="cpu", weights_only=False, mmap=True)
            except Exception as error:  # noqa: BLE001 - a torn shard file raises any of several error types
                raise CheckpointError(f"{folder}: unreadable checkpoint shard {candidate.name}: {error}") from error
    raise CheckpointError(f"{folder}: not a sharded checkpoint folder (no meta.pt or DeepSpeed model states)")


def _load_checkpoint_header(path: str) -> dict:
    import torch

    if Path(path).is_dir():  # DeepSpeed ZeRO / FSDP2 checkpoints are folders of per-rank shards
        return _sharded_checkpoint_header(Path(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - torch raises OSError/RuntimeError/pickle errors for a bad file
        size = Path(path).stat().st_size
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({size} bytes; truncated or not a .ckpt?): {error}"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def check_checkpoint_matches(path: str, model_config, model_class: str, data_config=None) -> dict:
    """Refuse a checkpoint of another method or model, or one whose fixed settings differ from the config.

    Returns the checkpoint's optimiser settings (for :class:`ResumeOptimizerOverride`).
    """
    checkpoint = _load_checkpoint_header(path)
    saved = checkpoint.get("hyper_parameters") or {}
    saved_class = saved.get("_class_path")
    if saved_class and saved_class != model_class:
        raise CheckpointError(
            f"{path} was written by {saved_class}, but this run trains {model_class}; "
            "resume it with that run's config, or start this one fresh (omit --ckpt_path)"
        )
    wanted = _plain(model_config.get("init_args", model_config))
    pairs = [(f"model.{k}", saved.get(k), wanted.get(k)) for k in FIXED_ON_RESUME if k in saved]
    saved_optim, wanted_optim = saved.get("optim") or {}, wanted.get("optim") or {}
    pairs += [
        (f"model.optim.{k}", saved_optim.get(k), wanted_optim.get(k)) for k in FIXED_OPTIM_ON_RESUME if k in saved_optim
    ]
    if "optimizer" in saved:  # the optimiser's state is restored as is: it cannot become another optimiser's
        pairs.append(("model.optimizer", _optimizer_name(saved["optimizer"]), _optimizer_name(wanted.get("optimizer"))))
    saved_data = checkpoint.get("datamodule_hyper_parameters") or {}
    if data_config is not None and saved_data:
        wanted_data = _plain(data_config.get("init_args", data_config))
        pairs += [(f"data.{k}", saved_data.get(k), wanted_data.get(k)) for k in FIXED_DATA_ON_RESUME if k in saved_data]
    for name, old, new in pairs:
        if _plain(old) != _plain(new):
            raise CheckpointError(
                f"{path}: {name} cannot change on resume (checkpoint: {_plain(old)!r}, this run: {_plain(new)!r}); "
                "use the checkpoint's value or start fresh"
            )
    return _plain(saved_optim)


def _optimizer_name(spec) -> str:
    """``SGD`` of ``{class_path: torch.optim.SGD}`` or ``torch.optim.sgd.SGD``; ``AdamW`` (the default) for none."""
    return (_plain(spec) or {}).get("class_path", "AdamW").rsplit(".", 1)[-1]


class ResumeOptimizerOverride(Callback):
    """After a resume, apply the command line's lr / weight decay / betas / eps to the restored optimiser.

    Lightning restores the optimiser's param groups (and the schedule's base rates) from the checkpoint, which
    would silently ignore e.g. ``--model.init_args.optim.lr`` on resume.
    """

    def __init__(self, saved: dict, wanted: dict) -> None:
        self.saved, self.wanted = saved, wanted

    def on_train_start(self, trainer, pl_module) -> None:
        old_lr, new_lr = self.saved.get("lr"), self.wanted.get("lr")
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if old_lr and new_lr and old_lr != new_lr:
                    group["lr"] *= new_lr / old_lr
                    group["initial_lr"] = group.get("initial_lr", old_lr) * new_lr / old_lr
                if "betas" in self.wanted and "betas" in group:  # an injected optimiser may have neither
                    group["betas"] = tuple(self.wanted["betas"])
                if "eps" in self.wanted and "eps" in group:
                    group["eps"] = self.wanted["eps"]
                if group.get("weight_decay") and "weight_decay" in self.wanted:
                    group["weight_decay"] = self.wanted["weight_decay"]
        if old_lr and new_lr and old_lr != new_lr:
            for config in trainer.lr_scheduler_configs:
                config.scheduler.base_lrs = [base * new_lr / old_lr for base in config.scheduler.base_lrs]
            print(f"rlft: resumed with optim.lr {new_lr} (checkpoint: {old_lr})", file=sys.stderr)


def _plain(value):
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def claim_output_dir(output_dir: Path, root_dir: Path, method: str) -> None:
    """Mark ``output_dir`` as this run's export folder; refuse one that another run (root folder) exported to."""
    marker = output_dir / RUN_MARKER
    mine = {"run_dir": str(root_dir.resolve()), "method": method}
    if marker.is_file():
        try:
            theirs = json.loads(marker.read_text())
        except (OSError, ValueError):
            theirs = {}
        if theirs.get("run_dir") != mine["run_dir"] or theirs.get("method") != mine["method"]:
            raise ConfigError(
                f"model.output_dir {output_dir} holds the export of another run ({theirs.get('method')} in "
                f"{theirs.get('run_dir')}); this run ({method} in {mine['run_dir']}) would overwrite it. "
                "Set --model.init_args.output_dir to a new folder, or delete the old one"
            )
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError(
            f"model.output_dir {output_dir} is not empty and was not written by this run; "
            "set --model.init_args.output_dir to a new folder, or delete it"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(mine))


class RLFTCLI(LightningCLI):
    """LightningCLI whose checkpoints live in ``<default_root_dir>/checkpoints`` so ``--ckpt_path last`` resumes.

    Every run starts from :data:`TRAINER_DEFAULTS` (``configs/trainer/default.yaml``), logs CSV and TensorBoard
    under ``default_root_dir`` unless the config names its loggers, and gets rlft's default callbacks.
    """

    def __init__(self, *args, trainer_class: type[Trainer] = Trainer, **kwargs) -> None:
        super().__init__(*args, trainer_class=trainer_class, **kwargs)  # rlft's: precision may be `auto`

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        defaults = {"default_config_files": [str(TRAINER_DEFAULTS)]}
        if add_subcommands:
            subparser_kwargs = {name: {**defaults, **subparser_kwargs.get(name, {})} for name in self.subcommands()}
        else:
            main_kwargs = {**defaults, **main_kwargs}
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config["trainer"]
        if trainer.get("enable_checkpointing") is False and trainer.get("callbacks"):
            # an overlay that turns checkpointing off (debug.yaml) meets the checkpoint callback of the defaults:
            # Lightning refuses the pair, so the off switch wins, as the user asked
            kept = [c for c in trainer["callbacks"] if not str(c.get("class_path", "")).endswith("ModelCheckpoint")]
            if len(kept) < len(trainer["callbacks"]):
                print("rlft: enable_checkpointing is false: the ModelCheckpoint callback is dropped", file=sys.stderr)
            trainer["callbacks"] = kept
        if trainer.get("logger") is None:  # Lightning's default would be one TensorBoard logger in lightning_logs/
            root = trainer.get("default_root_dir") or os.getcwd()
            trainer["logger"] = [
                Namespace(class_path=kind, init_args=Namespace(save_dir=root, name=name))
                for kind, name in (
                    ("rlft.callbacks.CSVLogger", "csv"),
                    ("lightning.pytorch.loggers.TensorBoardLogger", "tensorboard"),
                )
            ]

    def _parse_ckpt_path(self) -> None:
        # deliberately not Lightning's: it overwrites the user's settings with the checkpoint's; the match is
        # checked in `_prepare_subcommand_kwargs`, once the checkpoint folder is known
        return

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                # a fixed folder (not the logger's versioned one) is what lets a new process find `last.ckpt`
                if callback.dirpath is None:
                    callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
                if callback.save_last is None:
                    callback.save_last = True
        # on by default in every run (a config can add its own with other settings); RunMonitor only acts on the
        # online methods' metrics
        bound_collectives(trainer.strategy)  # before the process group exists (created when fit starts)
        defaults = [NonFiniteGuard, ResumeLogContinuity, RunMonitor, GracefulShutdown, ProgressLine]
        if trainer.loggers:  # it refuses to run without one
            defaults.append(functools.partial(LearningRateMonitor, logging_interval="step"))
        for make in defaults:
            kind = getattr(make, "func", make)
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.insert(0, make())
        return trainer

    def _last_checkpoint(self) -> Path | None:
        """``last.ckpt``, or, when a crash left it unreadable, the newest readable checkpoint beside it."""
        for callback in self.trainer.checkpoint_callbacks:
            if not (isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir()):
                continue
            folder = Path(callback.dirpath)
            last = folder / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            others = sorted(folder.glob(f"*{callback.FILE_EXTENSION}"), key=lambda p: p.stat().st_mtime, reverse=True)
            candidates = [last] * last.exists() + [p for p in others if p != last]
            for candidate in candidates:
                try:
                    _load_checkpoint_header(str(candidate))
                except CheckpointError as error:
                    print(f"rlft: warning: skipping {error}", file=sys.stderr)
                    continue
                if candidate != last:
                    print(f"rlft: warning: resuming from {candidate} (newest readable checkpoint)", file=sys.stderr)
                return candidate
        return None

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        refuse_impossible_settings(self.trainer, self.model)
        ckpt = kwargs.get("ckpt_path")
        if ckpt in ("last", LAST_OR_FRESH):
            found = self._last_checkpoint()
            if found is None and ckpt == "last":
                folders = [str(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
                raise CheckpointError(
                    f"--ckpt_path last: no last.ckpt in {', '.join(folders) or 'any checkpoint folder'}; "
                    f"nothing to resume. Use --ckpt_path {LAST_OR_FRESH} to resume when possible and start fresh "
                    "otherwise, or omit --ckpt_path"
                )
            ckpt = kwargs["ckpt_path"] = str(found) if found else None
            if found is None:
                print("rlft: no checkpoint to resume; starting fresh (--ckpt_path last_or_fresh)", file=sys.stderr)
        if ckpt and ckpt not in ("best", "hpc", "registry"):
            if not Path(ckpt).exists():
                raise CheckpointError(f"--ckpt_path {ckpt}: no such file or checkpoint folder")
            config = self.config[subcommand]
            saved_optim = check_checkpoint_matches(ckpt, config["model"], _class_path(self.model), config.get("data"))
            wanted_optim = _plain(config["model"].get("init_args", config["model"])).get("optim") or {}
            if subcommand == "fit" and saved_optim and wanted_optim:
                self.trainer.callbacks.append(ResumeOptimizerOverride(saved_optim, wanted_optim))
        if subcommand == "fit" and isinstance(self.model, RLFTModule) and self.trainer.is_global_zero:
            root = Path(self.trainer.default_root_dir)
            export = export_folder(self.model.hparams.get("output_dir"), root)
            claim_output_dir(export, root, _class_path(self.model))
        return kwargs


def _class_path(module) -> str:
    cls = type(module)
    # configs name classes by their public path (rlft.methods.SFT), not rlft.methods.sft.SFT
    public = cls.__module__.rsplit(".", 1)[0]
    try:
        if getattr(sys.modules.get(public), cls.__name__, None) is cls:
            return f"{public}.{cls.__name__}"
    except AttributeError:
        pass
    return f"{cls.__module__}.{cls.__name__}"


def run_lightning_cli(argv: list[str]) -> RLFTCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not os.environ.get("RLFT_DEBUG"):
        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar; the run prints ProgressLine
    return RLFTCLI(
        RLFTModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        save_config_callback=TrackedConfigCallback,  # also logs the resolved config (+ final adapter) to W&B
        parser_class=RLFTArgumentParser,
        # from the console, let LightningCLI read sys.argv itself (passing both triggers a warning)
        args=None if argv == sys.argv[1:] else argv,
        auto_configure_optimizers=False,
    )
