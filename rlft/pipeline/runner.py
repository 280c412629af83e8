"""Runs a pipeline: split the data, then each stage as its own ``python -m rlft fit`` process, then evaluation and
the report, all under one run folder::

    <run_dir>/data/{train,heldout}_pairs.jsonl   the split (held-out prompts are never trained on)
    <run_dir>/<stage>/config.yaml               the stage's complete rlft fit config (rerunnable by hand)
    <run_dir>/<stage>/relabelled_pairs.jsonl    with ``relabel: rm``: the pairs it trains on, re-ordered by the RM
    <run_dir>/<stage>/stage.log                 its stdout and stderr
    <run_dir>/<stage>/checkpoints/last.ckpt     Lightning checkpoints (a killed stage resumes from here)
    <run_dir>/<stage>/hf_model                  its export, what the next stages load
    <run_dir>/<stage>/DONE                      written after the export, with a fingerprint of the stage's
                                                settings; a re-run skips the stage unless its settings changed or
                                                a stage it starts from, is scored or relabelled by ran again
    <run_dir>/evaluation/results.json, <run_dir>/report/report.md
    <run_dir>/pipeline.lock                     held (flock) by the running pipeline: one pipeline per run folder

A stage runs in a subprocess so that a crash (or an out-of-memory kill) stays in it: a non-zero exit stops the
pipeline with the stage's name, exit code, log path and the end of its log. The subprocess and everything it starts
die with the pipeline (:mod:`rlft.pipeline.stage_process`). A stage's fingerprint covers the content (sha256) of
the data it trains on, so an edited data file re-runs the stages it reaches.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from rlft.pipeline.config import METHODS, PipelineConfig, StageSettings, method_of, set_dotted
from rlft.pipeline.lock import RunFolderLock, RunFolderLocked
from rlft.pipeline.online import run_online_dpo
from rlft.pipeline.stage_process import run_stage_process

log = logging.getLogger(__name__)

DONE = "DONE"

OWN_LOOPS = {"online_dpo": run_online_dpo}
"""Methods the runner drives itself (``loop(runner, name, stage, train_path)``) instead of one ``rlft fit``: their
fits are plain DPO (no ``model.rewards``: the loop scores its own samples) and their model is the last round's."""

UNSET_NOT_FINGERPRINTED = ("method", "relabel")
"""Stage settings added after run folders had fingerprints: left out while unset, so upgrading rlft does not re-run
every finished stage of an existing run folder."""


class StageFailed(RuntimeError):
    """A stage's process exited non-zero (or produced no output), or another pipeline holds the run folder."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PipelineRunner:
    """Run (or resume) a :class:`PipelineConfig`.

    Args:
        config: The loaded pipeline.
        python: Interpreter for the stage processes (default: this one).
        force: Stages to re-run even if they are DONE (their later stages are not forced).
    """

    def __init__(self, config: PipelineConfig, *, python: str | None = None, force: tuple[str, ...] = ()) -> None:
        self.config, self.python, self.force = config, python or sys.executable, set(force)
        self.run_dir = Path(config.run_dir)
        self.timings: dict[str, float] = {}
        self.ran: set[str] = set()  # stages (re-)run by this invocation

    # ----------------------------------------------------------------------------------------------- paths
    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def model_of(self, name: str) -> Path:
        """The exported model folder a stage hands to later stages."""
        stage = self.config.stages[name]
        if method_of(name, stage) in OWN_LOOPS:
            return self.stage_dir(name) / f"round_{stage.rounds}" / "hf_model"
        return self.stage_dir(name) / "hf_model"

    def policy_stages(self) -> list[str]:
        """Names, in file order, of the stages that train a policy the evaluation compares with the start."""
        return [name for name, stage in self.config.stages.items() if METHODS[method_of(name, stage)].policy]

    def stage_of(self, method: str) -> str | None:
        """The first stage (file order) of ``method``: e.g. the reward model the evaluation scores with."""
        return next((n for n, stage in self.config.stages.items() if method_of(n, stage) == method), None)

    def start_policy(self) -> str:
        """What the policy stages start from: the first one's ``init`` (normally the SFT export)."""
        for name in self.policy_stages():
            stage = self.config.stages[name]
            return str(self.model_of(stage.init)) if stage.init else self._base_model(stage)
        raise ValueError(f"{self.config.source}: no policy stage to evaluate")

    @staticmethod
    def _base_model(stage: StageSettings) -> str:
        config = yaml.safe_load(Path(stage.config).read_text())
        return stage.args.get("model.model") or config["model"]["init_args"]["model"]

    def is_done(self, folder: Path) -> bool:
        return (folder / DONE).exists()

    def fingerprint(self, *parts) -> str:
        """A short hash of settings (dataclasses, dicts, the text of the YAML files they name, the overlays): what
        a DONE stage was run with, so that a stage whose settings changed is not skipped."""

        def plain(value):
            if isinstance(value, StageSettings):
                value = {
                    k: v
                    for k, v in dataclasses.asdict(value).items()
                    if not (k in UNSET_NOT_FINGERPRINTED and v is None)
                }
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            if isinstance(value, dict) and isinstance(value.get("config"), str) and Path(value["config"]).is_file():
                value = {**value, "config_text": Path(value["config"]).read_text()}
            return value

        overlays = [Path(o).read_text() if Path(o).is_file() else o for o in self.config.overlays]
        text = json.dumps([plain(p) for p in parts] + [overlays], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @staticmethod
    def done_settings(folder: Path) -> str | None:
        """The fingerprint a DONE stage recorded (None for a run folder written before fingerprints existed)."""
        try:
            return json.loads((folder / DONE).read_text()).get("settings")
        except (OSError, ValueError):
            return None

    # ----------------------------------------------------------------------------------------------- configs
    def fit_config(
        self, name: str, stage: StageSettings, folder: Path, *, data_path: str, model: str | None = None
    ) -> dict:
        """The stage's base YAML with run-folder paths, data and upstream models wired in, then its ``args``."""
        config = yaml.safe_load(Path(stage.config).read_text())
        trainer = config.setdefault("trainer", {})
        trainer["default_root_dir"] = str(folder)
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers] if isinstance(loggers, dict) else []:
            logger.setdefault("init_args", {})["save_dir"] = str(folder)
        set_dotted(config, "model.output_dir", str(folder / "hf_model"))
        set_dotted(config, "data.path", data_path)
        config["data"].get("init_args", {}).pop("val_path", None)
        if model is not None:
            set_dotted(config, "model.model", model)
        elif stage.init:
            set_dotted(config, "model.model", str(self.model_of(stage.init)))
        if stage.reward and method_of(name, stage) not in OWN_LOOPS:
            rm = str(self.model_of(stage.reward))
            set_dotted(config, "model.rewards", [{"source": "reward_model", "name": "rm", "options": {"path": rm}}])
        for key, value in stage.args.items():
            set_dotted(config, key, copy.deepcopy(value))
        return config

    # ----------------------------------------------------------------------------------------------- processes
    def _run_process(self, name: str, argv: list[str], log_path: Path) -> None:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"\n===== rlft pipeline: {' '.join(argv)} ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            out.flush()
            code = run_stage_process(argv, stdout=out, env=env)
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - started
        if code != 0:
            tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
            raise StageFailed(
                f"stage {name!r} failed with exit code {code}; full log: {log_path}\n--- last lines ---\n{tail}"
            )

    def run_fit(self, name: str, config: dict, folder: Path, expected: Path, *, settings: str | None = None) -> None:
        """Write ``folder/config.yaml`` and run ``rlft fit`` on it (resuming from ``last.ckpt`` when there is one)."""
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [self.python, "-m", "rlft", "fit", "-c", str(config_path)]
        for overlay in self.config.overlays:
            argv += ["-c", overlay]
        resumed = (folder / "checkpoints" / "last.ckpt").exists()
        if resumed:
            argv += ["--ckpt_path", "last"]
        print(
            f"rlft pipeline: stage {name} {'resuming from last.ckpt' if resumed else 'starting'} "
            f"(log: {folder / 'stage.log'})",
            flush=True,
        )
        self._run_process(name, argv, folder / "stage.log")
        if not expected.exists():
            raise StageFailed(f"stage {name!r} exited 0 but wrote no {expected}; see {folder / 'stage.log'}")
        self.mark_done(folder, {"output": str(expected), "config": str(config_path), "settings": settings})

    def mark_done(self, folder: Path, info: dict) -> None:
        (folder / DONE).write_text(json.dumps({**info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    # ----------------------------------------------------------------------------------------------- stages
    def split(self) -> dict:
        from rlft.pipeline.split import split_pairs

        folder = self.run_dir / "data"
        settings = self.fingerprint(self.config.data)
        d = self.config.data
        contents = {str(p): file_sha256(p) for p in d.paths if Path(p).is_file()}
        if self.is_done(folder):
            recorded = self.done_settings(folder)
            if recorded is not None and recorded != settings:
                raise ValueError(
                    f"{self.config.source}: the data settings changed since {folder} was split, and "
                    "every stage of this run trained on that split; use another run_dir for the new "
                    "data"
                )
            done = json.loads((folder / DONE).read_text())
            if "data" in self.force:  # the same files and settings split the same way: what depends on it stays DONE
                print("rlft pipeline: --force data: splitting again", flush=True)
            elif done.get("data_sha256", contents) == contents:  # (a folder split before hashes existed: as it was)
                return json.loads((folder / "split.json").read_text())
            else:
                # split again: the stages' fingerprints hash the new split files, so exactly the stages whose
                # training data changed re-run, and the evaluation follows any held-out change
                edited = sorted(p for p in contents if done["data_sha256"].get(p) != contents[p])
                print(f"rlft pipeline: data file(s) {edited} changed since the split: splitting again", flush=True)
        info = split_pairs(d.paths, folder, heldout_fraction=d.heldout_fraction, seed=d.seed, format=d.format)
        (folder / "split.json").write_text(json.dumps(info, indent=2))
        self.mark_done(folder, {"output": str(folder), "settings": settings, "data_sha256": contents})
        print(
            f"rlft pipeline: data split {info['train']} train / {info['heldout']} held-out pairs "
            f"(dropped: {info['dropped'] or 'none'})",
            flush=True,
        )
        return info

    @staticmethod
    def stage_data(stage: StageSettings, train_path: str) -> dict[str, str]:
        """sha256 of every data file a stage reads: the split's train file and any file its ``data.*`` args name
        (keyed by role, not path, so that ``--run_dir`` elsewhere with the same data fingerprints the same)."""
        files = {"train": train_path}
        for key, value in stage.args.items():
            if key.startswith("data.") and isinstance(value, str) and Path(value).is_file():
                files[key] = value
        return {role: file_sha256(path) for role, path in files.items()}

    def run_stage(self, name: str, stage: StageSettings, train_path: str) -> None:
        folder = self.stage_dir(name)
        settings = self.fingerprint(name, stage, self.stage_data(stage, train_path))
        stale = {stage.init, stage.reward, stage.relabel} & self.ran  # an upstream stage re-ran: this is out of date
        recorded = self.done_settings(folder) if self.is_done(folder) else None
        changed = recorded is not None and recorded != settings
        if self.is_done(folder) and name not in self.force and not stale and not changed:
            print(f"rlft pipeline: stage {name} already DONE, skipped", flush=True)
            return
        started = folder / "settings"  # what a killed, unfinished stage was started with
        if not self.is_done(folder) and started.exists() and started.read_text().strip() != settings:
            print(
                f"rlft pipeline: stage {name} re-runs from scratch (its settings changed since it was killed)",
                flush=True,
            )
            shutil.rmtree(folder)
        if self.is_done(folder):  # forced, stale or changed: start it afresh, not from its finished checkpoint
            why = "--force" if name in self.force else f"{sorted(stale)} ran again" if stale else "its settings changed"
            print(f"rlft pipeline: stage {name} re-runs from scratch ({why})", flush=True)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        started.write_text(settings + "\n")
        self.ran.add(name)
        (folder / DONE).unlink(missing_ok=True)
        loop = OWN_LOOPS.get(method_of(name, stage))
        if loop is not None:
            loop(self, name, stage, train_path)
            self.mark_done(folder, {"output": str(self.model_of(name)), "settings": settings})
            return
        if stage.relabel:
            from rlft.pipeline.relabel import relabel_stage

            train_path = relabel_stage(self, name, stage, train_path)
        self.run_fit(
            name,
            self.fit_config(name, stage, folder, data_path=train_path),
            folder,
            self.model_of(name),
            settings=settings,
        )

    def evaluate(self) -> Path:
        from rlft.pipeline.evaluate import evaluation_config

        folder = self.run_dir / "evaluation"
        results = folder / "results.json"
        heldout = self.run_dir / "data" / "heldout_pairs.jsonl"
        settings = self.fingerprint(self.config.evaluation, {"heldout": file_sha256(heldout)})
        unchanged = self.done_settings(folder) in (None, settings)
        if self.is_done(folder) and "evaluation" not in self.force and not self.ran and unchanged:
            print("rlft pipeline: evaluation already DONE, skipped", flush=True)
            return results
        (folder / DONE).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / "config.yaml"
        config_path.write_text(yaml.safe_dump(evaluation_config(self), sort_keys=False))
        print(f"rlft pipeline: evaluation (log: {folder / 'stage.log'})", flush=True)
        argv = [self.python, "-m", "rlft.pipeline.evaluate", "--config", str(config_path)]
        self._run_process("evaluation", argv, folder / "stage.log")
        if not results.exists():
            raise StageFailed(f"stage 'evaluation' exited 0 but wrote no {results}; see {folder / 'stage.log'}")
        self.mark_done(folder, {"output": str(results), "settings": settings})
        return results

    def run(self) -> Path | None:
        """Run every stage not yet DONE; returns the report path (None without an evaluation section)."""
        lock = RunFolderLock(self.run_dir)
        try:
            lock.acquire()
        except RunFolderLocked as error:  # the CLI reports a StageFailed as one line
            raise StageFailed(str(error)) from None
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> Path | None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        split = self.split()
        train_path = split["files"]["train"]
        for name, stage in self.config.stages.items():
            self.run_stage(name, stage, train_path)
        if self.config.evaluation is None:
            return None
        results = self.evaluate()
        from rlft.eval.report import build_pipeline_report

        (self.run_dir / "timings.json").write_text(json.dumps(self.timings, indent=2))
        report = build_pipeline_report(results, self.run_dir, out_dir=self.run_dir / "report", title=self.config.title)
        print(f"rlft pipeline: report written to {report}", flush=True)
        return report
