"""The docs are tested: README.md and docs/*.md say what the code does.

* every ```python block either quotes a research-surface file (first line ``# from tests/methods/my_pkg/<file>.py``:
  each non-blank line of the block occurs, in order, in that file; a line ``...`` marks an elision) or runs and
  exits 0 (offline, tiny models only);
* every ``rlft ...`` line of a ```bash block parses: ``rlft fit|validate`` with ``--print_config`` appended, every
  other subcommand with ``--help`` appended (both must exit 0);
* every ``configs/...yaml`` path the docs mention exists, and every relative link of the README resolves.

The CLI lines and the executed blocks each run in their own process, forked from a fork server that imported rlft's
CLI once (a fresh interpreter per line would spend most of its time importing torch and Lightning), two at a time.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
QUOTABLE = REPO / "tests" / "methods" / "my_pkg"
QUOTE = re.compile(r"^# from (tests/methods/my_pkg/\w+\.py)\s*$")
CONFIG_PATH = re.compile(r"(?<![\w/.-])configs/[\w/.-]+?\.yaml")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# `rlft` lines that cannot parse here, each with the reason (keep this list short: prefer lines that run)
SKIPPED_LINES: dict[str, str] = {
    "rlft fit -c runs/tune-sft/best.yaml": "best.yaml is written by the `rlft tune` run "
    "on the line above it (docs/tuning.md)",
}
CHILD_TIMEOUT_S = 300  # a block that trains a tiny model, on a loaded 2-core machine


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    blocks, lines, i = [], doc.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{doc.relative_to(REPO)}:{i + 1}: unclosed code block"
        blocks.append(Block(doc, i + 1, opening.group(1), "\n".join(lines[i + 1 : end])))
        i = end + 1
    return blocks


BLOCKS = [block for doc in DOCS for block in _blocks(doc)]
PYTHON = [block for block in BLOCKS if block.language == "python"]
QUOTED = [block for block in PYTHON if QUOTE.match(block.text.splitlines()[0] if block.text else "")]
EXECUTED = [block for block in PYTHON if block not in QUOTED]


def _rlft_lines() -> list[tuple[str, str]]:
    """``(where, command)`` of every ``rlft ...`` line of the bash blocks: continuations joined, comments dropped,
    each command once."""
    found: dict[str, str] = {}
    for block in BLOCKS:
        if block.language != "bash":
            continue
        logical, start = "", 0
        for offset, raw in enumerate(block.text.splitlines(), start=1):
            start = start or offset
            logical += raw.rstrip()
            if logical.endswith("\\"):
                logical = logical[:-1] + " "
                continue
            if logical.strip().startswith("rlft "):
                command = shlex.join(shlex.split(logical, comments=True))  # comments and spacing dropped
                found.setdefault(command, f"{block.where}+{start}")
            logical, start = "", 0
    return [(where, line) for line, where in found.items()]


RLFT_LINES = _rlft_lines()


# ------------------------------------------------------------------------------------------ running in a fork
PARALLEL = 2  # forked children at a time


@pytest.fixture(scope="module")
def fork():
    """Run functions in processes forked from a fork server that imported rlft's CLI (the heavy imports: torch,
    Lightning, transformers, jsonargparse) once, the research package on the path:
    ``fork({key: (function, *args)}) -> {key: (exit code, output)}``, ``PARALLEL`` at a time."""
    package = str(REPO / "tests" / "methods")  # the research package the docs' `--model` lines name
    sys.path.insert(0, package)
    # Not a plain fork of this process: after the suite's earlier tests ran here, its OpenMP thread pool may
    # not survive a fork, nor does a lock another thread (a server, a tokenizer pool) held at that moment: CI saw a
    # 6-line loss block hang for 300 s.
    # A fork server is a fresh process that imports the heavy modules once and forks children before any op ran.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["rlft.cli", "rlft.cli.fit", "rlft.methods"])

    def run(jobs: dict) -> dict:
        results, pending, running = {}, list(jobs.items()), []
        with tempfile.TemporaryDirectory() as logs:
            while pending or running:
                while pending and len(running) < PARALLEL:
                    key, (target, *args) = pending.pop(0)
                    log = Path(logs) / f"{len(jobs) - len(pending)}.log"  # 1, 2, ...: one file per job
                    process = context.Process(target=_child, args=(str(log), target, *args))
                    process.start()
                    running.append((key, process, log, time.monotonic()))
                key, process, log, started = running.pop(0)
                process.join(max(0.0, CHILD_TIMEOUT_S - (time.monotonic() - started)))
                if process.is_alive():
                    process.kill()
                    process.join()
                    results[key] = (-1, f"timed out after {CHILD_TIMEOUT_S} s\n" + log.read_text())
                else:
                    results[key] = (process.exitcode, log.read_text())
        return results

    yield run
    sys.path.remove(package)


@pytest.fixture(scope="module")
def cli_results(fork) -> dict:
    """Exit code and output of every documented ``rlft`` line, run once for the module."""
    jobs = {}
    for _, line in RLFT_LINES:
        if line not in SKIPPED_LINES:
            argv = shlex.split(line)[1:]
            argv.append("--print_config" if argv[0] in ("fit", "validate") else "--help")
            jobs[line] = (_run_cli, argv)
    return fork(jobs)


@pytest.fixture(scope="module")
def block_results(fork) -> dict:
    """Exit code and output of every executed Python block, run once for the module."""
    return fork({block.where: (_exec_block, block.text, block.where) for block in EXECUTED})


def _child(log_path: str, target, *args) -> None:
    code = 0
    with open(log_path, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO / "tests" / "methods"), os.environ.get("PYTHONPATH")])
        )
        os.chdir(REPO)
        try:
            target(*args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        log.flush()
    os._exit(code)


def _run_cli(argv: list[str]) -> None:
    import rlft.cli

    rlft.cli.main(argv)


def _exec_block(text: str, where: str) -> None:
    exec(compile(text, where, "exec"), {"__name__": "__main__"})


# ------------------------------------------------------------------------------------------ the tests
def test_the_docs_have_blocks_of_each_kind():
    assert QUOTED and EXECUTED and RLFT_LINES, "the block parser found nothing: did the fences change?"
    assert all(reason.strip() for reason in SKIPPED_LINES.values())


@pytest.mark.parametrize("block", QUOTED, ids=[block.where for block in QUOTED])
def test_quoted_python_occurs_in_order_in_its_source(block: Block):
    header, *lines = block.text.splitlines()
    source = REPO / QUOTE.match(header).group(1)
    assert source.parent == QUOTABLE and source.is_file(), f"{block.where}: no such file {source}"
    source_lines = [line.rstrip() for line in source.read_text().splitlines()]
    position = 0
    for line in lines:
        if not line.strip() or line.strip() == "...":
            continue
        try:
            position = source_lines.index(line.rstrip(), position) + 1
        except ValueError:
            pytest.fail(
                f"{block.where}: this line is not in {source.relative_to(REPO)} (after line {position}):\n{line}"
            )


@pytest.mark.parametrize("block", EXECUTED, ids=[block.where for block in EXECUTED])
def test_python_block_runs(block: Block, block_results):
    code, output = block_results[block.where]
    assert code == 0, f"{block.where}: the block exited with {code}:\n{output[-4000:]}"


@pytest.mark.parametrize(("where", "line"), RLFT_LINES, ids=[where for where, _ in RLFT_LINES])
def test_rlft_command_line_parses(where: str, line: str, cli_results):
    if line in SKIPPED_LINES:
        pytest.skip(SKIPPED_LINES[line])
    code, output = cli_results[line]
    check = "--print_config" if line.split()[1] in ("fit", "validate") else "--help"
    assert code == 0, f"{where}: `{line} {check}` exited with {code}:\n{output[-4000:]}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(doc.relative_to(REPO)) for doc in DOCS])
def test_config_paths_exist(doc: Path):
    missing = sorted({path for path in CONFIG_PATH.findall(doc.read_text()) if not (REPO / path).is_file()})
    assert not missing, f"{doc.relative_to(REPO)} names configs that do not exist: {missing}"


def test_readme_links_resolve():
    readme = REPO / "README.md"
    targets = [target for target in LINK.findall(readme.read_text()) if not re.match(r"^(\w+:|#)", target)]
    assert targets, "the README links nowhere: did the link syntax change?"
    missing = [target for target in targets if not (REPO / target.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
