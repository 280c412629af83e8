"""Hostile pass, round 4: every case that got through (a traceback, exit 0 on bad input, a silent ignore, a hang),
each guarded by the general mechanism that now refuses it with one line.

Most checks call the mechanism in-process (seconds); the few CLI calls fail before any model is loaded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlft.cli import run_tool_command
from rlft.cli.options import check_listen, check_options, checked, prepare_out_dir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def rlft(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RLFT_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "rlft", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)


def one_line(result: subprocess.CompletedProcess, command: str, *expected: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"rlft {command}: error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]


# ---------------------------------------------------------------- one range table (generate, eval, pipeline)
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("top_p", 2.0),
        ("top_p", 0.0),
        ("seed", -1),
        ("seed", 2**64),
        ("limit", -1),
        ("batch_size", 0),
        ("stride", 0),
        ("workers", 0),
        ("n_bootstrap", 0),
        ("max_new_tokens", 0),
    ],
)
def test_option_ranges_refuse_out_of_range_values(option, value):
    with pytest.raises(ValueError, match=rf"^--{option} must be .*, got"):
        check_options({option: value})


def test_option_ranges_accept_the_defaults_and_unset_optionals():
    check_options({"temperature": 0.0, "top_p": 1.0, "seed": 0, "limit": None, "stride": None, "workers": None})


def test_eval_commands_check_options_and_make_out_before_any_work(tmp_path):
    ran = []

    @checked
    def command(data: str, limit: int | None = None, out: str = "eval_results") -> None:
        """Doc.

        Args:
            data: Data.
            limit: Limit.
            out: Out.
        """
        ran.append(data)

    with pytest.raises(ValueError, match="--limit must be > 0"):
        command("x", limit=-1, out=str(tmp_path / "o"))
    taken = tmp_path / "taken.txt"
    taken.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        command("x", out=str(taken))
    assert not ran
    command("x", out=str(tmp_path / "new" / "folder"))
    assert ran == ["x"] and (tmp_path / "new" / "folder").is_dir()


def test_eval_subcommands_keep_their_help_behind_the_range_check():
    from rlft.cli.eval import COMMANDS

    names = [command.__name__ for command in COMMANDS]
    assert names[:3] == ["perplexity", "accuracy", "rouge"] and "report" in names
    assert "Use only the first N records." in (COMMANDS[0].__doc__ or "")


def test_prepare_out_dir_refuses_a_folder_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="cannot create the folder"):
        prepare_out_dir(tmp_path / "f" / "sub")


def test_generate_refuses_top_p_above_one_before_loading():
    one_line(rlft("generate", "./no_such_model", "--prompt", "hi", "--top_p", "2"), "generate", "--top_p")


# ---------------------------------------------------------------- the router: taken output paths are user errors
@pytest.mark.parametrize("error", [FileExistsError("out exists and is not empty"), PermissionError("denied")])
def test_router_reports_taken_or_forbidden_paths_in_one_line(error, capsys, monkeypatch):
    monkeypatch.delenv("RLFT_DEBUG", raising=False)

    def fail(argv):
        raise error

    with pytest.raises(SystemExit) as exit_:
        run_tool_command("export", fail, [])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.startswith(f"rlft export: error: {error}")


# ---------------------------------------------------------------- listening address checked before loading
def test_listen_check_refuses_bad_port_unknown_host_and_address_in_use():
    with pytest.raises(ValueError, match="--port must be in 0-65535"):
        check_listen("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="--host no.such.host.invalid"):
        check_listen("no.such.host.invalid", 8000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ValueError, match="cannot listen there"):
            check_listen("127.0.0.1", taken.getsockname()[1])


def test_label_serve_refuses_zero_concurrency_instead_of_hanging(tmp_path):
    from rlft.cli.label import run

    with pytest.raises(ValueError, match="--concurrency must be >= 1"):
        run(["serve", "--db", str(tmp_path / "l.db"), "--concurrency", "0", "--port", "0"])
    with pytest.raises(ValueError, match="--lease-minutes must be a finite number > 0"):
        run(["serve", "--db", str(tmp_path / "l.db"), "--lease-minutes", "-1", "--port", "0"])


# ---------------------------------------------------------------- label store: unusable databases, empty imports
@pytest.mark.parametrize("kind", ["garbage", "folder", "url"])
def test_label_database_that_cannot_be_opened_is_one_line(tmp_path, kind):
    from rlft.label.db import open_database

    target = {"garbage": tmp_path / "x.db", "folder": tmp_path, "url": "frob://x"}[kind]
    if kind == "garbage":
        target.write_text("not a database")
    with pytest.raises((ValueError, ConnectionError), match="--db "):
        open_database(str(target))


def test_label_import_refuses_an_empty_file_and_export_negative_votes(tmp_path):
    from rlft.cli.label import run

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no examples to import"):
        run(["import", "--db", str(tmp_path / "l.db"), "--pairs", str(tmp_path / "empty.jsonl")])
    with pytest.raises(ValueError, match="--min-votes must be >= 1"):
        run(["export", "--db", str(tmp_path / "l.db"), "--out", str(tmp_path / "o.jsonl"), "--min-votes", "-1"])


def test_label_token_of_one_character_is_refused(tmp_path):
    from rlft.label import store
    from rlft.label.db import open_database

    with pytest.raises(store.LabelError, match="at least 8 characters"):
        store.add_labeler(open_database(str(tmp_path / "l.db")), "carol", token="x")


# ---------------------------------------------------------------- judge: unreachable endpoint, foreign/torn cache
def test_judge_endpoint_that_cannot_be_reached_is_a_connection_error():
    from rlft.eval.judge import OpenAIJudge

    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout_s=5)
    with pytest.raises(ConnectionError, match="127.0.0.1:9.*cannot be reached"):
        judge.complete([[{"role": "user", "content": "hi"}]])


def test_judge_cache_refuses_a_foreign_file_and_recovers_a_torn_last_line(tmp_path):
    from rlft.eval.judge import JudgeCache

    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"title": "x"}\n{"key": "k", "reply": "r"}\n')
    with pytest.raises(ValueError, match=r"notes.jsonl:1: not a judge cache line"):
        JudgeCache(foreign)
    torn = tmp_path / "cache.jsonl"
    torn.write_text('{"key": "a", "reply": "Score: 3"}\n{"key": "b", "re')
    cache = JudgeCache(torn)
    assert cache.get("a") == "Score: 3" and cache.get("b") is None
    cache.put("c", "Score: 5")
    again = JudgeCache(torn)  # the torn line was replaced, not buried mid-file
    assert again.entries == {"a": "Score: 3", "c": "Score: 5"}


# ---------------------------------------------------------------- eval data and results
def test_eval_rows_from_an_empty_file_are_refused_naming_the_file(tmp_path):
    from rlft.eval.data import load_raw_rows, load_records

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no rows to evaluate"):
        load_raw_rows(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="empty.jsonl: no rows to evaluate"):
        load_records(tmp_path / "empty.jsonl", kind="pairs")


def test_eval_report_refuses_a_named_file_that_is_not_a_result(tmp_path):
    from rlft.eval.results import read_results

    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "torn.json").write_text('{"kind": "x"')
    with pytest.raises(ValueError, match="list.json: not an rlft eval result"):
        read_results([tmp_path / "list.json"])
    with pytest.raises(ValueError, match="torn.json: not a result JSON file"):
        read_results([tmp_path / "torn.json"])


def test_accuracy_label_that_is_no_index_names_the_row():
    from rlft.eval.accuracy import choice_item

    with pytest.raises(ValueError, match="row 3: label 'four' is neither a choice index"):
        choice_item({"question": "2+2?", "choices": ["3", "4"], "answer": "four"}, 3)


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path):
    from rlft.models.checkpoint import checkpoint_hparams

    (tmp_path / "g.ckpt").write_text("hello")
    with pytest.raises(ValueError, match="g.ckpt: not a readable checkpoint"):
        checkpoint_hparams(str(tmp_path / "g.ckpt"))


# ---------------------------------------------------------------- pipeline file: types, ranges, YAML, --force
def _pipeline(tmp_path: Path, **changes) -> Path:
    config = yaml.safe_load((REPO / "configs/pipelines/tiny.yaml").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # stages run in file order
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages__sft__args": "trainer.max_steps=1"}, "stages.sft.args: expected dict"),
        ({"evaluation__limit": -3}, "evaluation.limit must be > 0"),
        ({"evaluation__temperature": "hot"}, "evaluation.temperature: expected float"),
        ({"data__heldout_fraction": 1.5}, "data.heldout_fraction must be in (0, 1)"),
    ],
)
def test_pipeline_file_values_are_type_and_range_checked(tmp_path, change, message, monkeypatch):
    from rlft.pipeline import load_pipeline

    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pipeline(_pipeline(tmp_path, **change))


def test_pipeline_file_that_is_not_yaml_names_its_line(tmp_path):
    from rlft.pipeline import load_pipeline

    (tmp_path / "bad.yaml").write_text("run_dir: x\ndata: [1, 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml:3: not valid YAML"):
        load_pipeline(tmp_path / "bad.yaml")


def test_pipeline_force_of_an_unknown_step_is_refused(tmp_path, monkeypatch):
    from rlft.cli.pipeline import main

    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="--force frob: not a step"):
        main(["-c", str(_pipeline(tmp_path)), "--force", "frob", "--print_plan"])


def test_pipeline_force_data_splits_again(tmp_path, capsys, monkeypatch):
    from rlft.pipeline import PipelineRunner, load_pipeline

    monkeypatch.chdir(REPO)
    config = load_pipeline(_pipeline(tmp_path, run_dir=str(tmp_path / "run")))
    first = PipelineRunner(config).split()
    capsys.readouterr()
    assert PipelineRunner(config, force=("data",)).split() == first
    assert "--force data: splitting again" in capsys.readouterr().out


# ---------------------------------------------------------------- tune: flags, storage, trial errors
def test_tune_refuses_zero_trials_and_a_storage_url_it_cannot_open(tmp_path, monkeypatch):
    from rlft.cli.tune import main

    monkeypatch.chdir(REPO)
    base = ["-c", "configs/sft/tiny.yaml", "--search", "configs/tune/sft_lr.yaml", "--out", str(tmp_path / "t")]
    with pytest.raises(SystemExit, match="--trials must be >= 1"):
        main([*base, "--trials", "0"])
    with pytest.raises(ValueError, match="--storage frob://x: not a database URL"):
        main([*base, "--trials", "1", "--storage", "frob://x"])
