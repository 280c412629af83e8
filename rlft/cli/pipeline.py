"""``rlft pipeline -c configs/pipelines/NAME.yaml``: run (or resume) a whole SFT -> RM -> policy methods -> eval job.

Re-running the same command skips every stage with a ``DONE`` marker and resumes a killed one from its
``last.ckpt``; ``--force STAGE`` re-runs one stage (e.g. ``--force evaluation`` after changing its settings).
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="rlft pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", required=True, help="pipeline YAML (see configs/pipelines/)")
    parser.add_argument("--run_dir", help="override the config's run_dir")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="re-run this step even if DONE: data, a stage's name, or evaluation",
    )
    parser.add_argument("--print_plan", action="store_true", help="print the stages and their configs, run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from rlft.pipeline import PipelineRunner, StageFailed, load_pipeline

    config = load_pipeline(args.config)  # a missing or invalid file: the `rlft` router's one error path reports it
    if args.run_dir:
        config.run_dir = args.run_dir
    can_force = ["data", *config.stages, *(["evaluation"] if config.evaluation is not None else [])]
    if unknown := [name for name in args.force if name not in can_force]:
        raise ValueError(f"--force {' '.join(unknown)}: not a step of {args.config}; choose from {can_force}")
    runner = PipelineRunner(config, force=tuple(args.force))
    if args.print_plan:
        for name, stage in config.stages.items():
            print(
                f"{name}: {stage.config} -> {runner.model_of(name)}"
                + (f" (method: {stage.method})" if stage.method else "")
                + (f" (from {stage.init})" if stage.init else "")
                + (f" (reward: {stage.reward})" if stage.reward else "")
                + (f" (pairs relabelled by {stage.relabel})" if stage.relabel else "")
            )
        print(f"evaluation -> {runner.run_dir / 'evaluation'}; report -> {runner.run_dir / 'report' / 'report.md'}")
        return
    try:
        runner.run()
    except StageFailed as error:
        print(f"rlft pipeline: {error}", file=sys.stderr)
        raise SystemExit(1) from None
