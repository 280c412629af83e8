"""One error path for every ``rlft`` subcommand: a user mistake prints ``rlft <command>: error: <one line>`` and a
``--debug`` hint, exits 1 and shows no traceback; ``--debug`` (or ``RLFT_DEBUG=1``) shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def rlft(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {name: value for name, value in os.environ.items() if name != "RLFT_DEBUG"}
    full.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "rlft", *args], cwd=REPO_ROOT, env=full, capture_output=True, text=True, timeout=280
    )


def assert_one_error_line(result: subprocess.CompletedProcess, command: str, *expected: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"rlft {command}: error: "), errors[0]
    for text in expected:
        assert text in errors[0], errors[0]
    assert "--debug" in result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    not_a_dataset = folder / "notes.jsonl"
    not_a_dataset.write_text('{"title": "shopping", "items": ["milk"]}\n')
    return {"folder": folder, "not_a_dataset": not_a_dataset, "missing": folder / "missing.jsonl"}


def test_export_names_the_missing_model_folder(files):
    result = rlft("export", "./no_such_model", "--to", "merged", "--out", str(files["folder"] / "merged"))
    assert_one_error_line(result, "export", "model path not found: ./no_such_model")


def test_export_refuses_quant_for_a_folder_export(files):
    result = rlft("export", "tiny-llama", "--to", "merged", "--quant", "q8_0", "--out", str(files["folder"] / "m"))
    assert_one_error_line(result, "export", "--quant is for --to gguf")


def test_serve_names_the_missing_model_folder():
    assert_one_error_line(rlft("serve", "./no_such_model", "--device", "cpu"), "serve", "./no_such_model")


def test_generate_refuses_quantization_on_a_cpu():
    result = rlft("generate", "tiny-llama", "--prompt", "hi", "--device", "cpu", "--quantization", "4bit")
    assert_one_error_line(result, "generate", "--quantization 4bit needs a CUDA GPU")


def test_eval_names_a_file_that_is_not_a_dataset(files):
    result = rlft("eval", "perplexity", "tiny-llama", str(files["not_a_dataset"]), "--device", "cpu")
    assert_one_error_line(result, "eval", "notes.jsonl: cannot detect the data format")


def test_eval_harness_offline_says_the_task_needs_the_hub(files):
    pytest.importorskip("lm_eval")
    result = rlft(
        "eval",
        "harness",
        "tiny-llama",
        "--tasks",
        "[piqa]",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--out",
        str(files["folder"] / "harness"),
    )
    assert_one_error_line(result, "eval", "--tasks piqa", "HF_HUB_OFFLINE", "rlft_mc_basics")


def test_pipeline_names_the_missing_config(files):
    result = rlft("pipeline", "-c", str(files["folder"] / "missing.yaml"))
    assert_one_error_line(result, "pipeline", "missing.yaml")


def test_tune_names_the_missing_search_file(files):
    result = rlft(
        "tune",
        "-c",
        "configs/dpo/tiny.yaml",
        "--search",
        str(files["folder"] / "space.yaml"),
        "--out",
        str(files["folder"] / "tune"),
    )
    line = assert_one_error_line(result, "tune", "space.yaml")
    assert "rlft tune: error: rlft tune" not in line  # the command's own prefix is not repeated


def test_label_names_the_missing_pairs_file(files):
    result = rlft("label", "import", "--db", str(files["folder"] / "labels.db"), "--pairs", str(files["missing"]))
    assert_one_error_line(result, "label", "missing.jsonl")


def test_data_prepare_names_the_missing_data_file(files):
    result = rlft("data", "prepare", "--data.path", str(files["missing"]), "--model", "tiny-llama", "--kind", "sft")
    assert_one_error_line(result, "data", "--data.path", "missing.jsonl", "no such file")


def test_models_refuses_an_unknown_alias_with_one_parser_error():
    result = rlft("models", "pull", "smollm2-135m-instrukt")
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a usage error: argparse's exit code
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "smollm2-135m-instruct" in errors[0], result.stderr


def test_debug_shows_the_traceback(files):
    result = rlft("export", "./no_such_model", "--to", "merged", "--out", str(files["folder"] / "m"), "--debug")
    assert result.returncode == 1 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr
    refusal = rlft(
        "tune",
        "-c",
        "configs/dpo/tiny.yaml",
        "--search",
        str(files["folder"] / "space.yaml"),
        "--out",
        str(files["folder"] / "tune"),
        env={"RLFT_DEBUG": "1"},
    )
    assert refusal.returncode == 1 and "Traceback" in refusal.stderr and "space.yaml" in refusal.stderr
