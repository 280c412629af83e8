"""The tokenised-data cache: a second setup does not encode again; any change to what the examples depend on (file
content, tokenizer, chat template, options) misses; ``cache=False`` always encodes; ``rlft data prepare`` fills it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import rlft.data.kinds as kinds_module  # each data kind's encoder is called from its registry entry
from rlft.data import PreferenceDataModule
from rlft.models import load_tokenizer

PAIRS = "rlft/assets/sample_pairs.jsonl"


@pytest.fixture(autouse=True)
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RLFT_DATA_CACHE", str(root))
    return root


@pytest.fixture
def encoder_calls(monkeypatch) -> dict:
    """Counts calls of the encoders the data module uses."""
    calls = {"n": 0}
    for name in ("encode_sft", "encode_pair", "encode_prompt"):
        real = getattr(kinds_module, name)

        def counted(*args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kinds_module, name, counted)
    return calls


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-qwen2")


def _setup(tokenizer, kind: str, path: str, **kwargs) -> PreferenceDataModule:
    options = {"batch_size": 4, "max_length": 128, "val_fraction": 0.2, **kwargs}
    dm = PreferenceDataModule(path=path, **options)
    dm.attach(kind, tokenizer).setup("fit")
    return dm


@pytest.fixture
def pairs_file(tmp_path, repo_root):
    path = tmp_path / "pairs.jsonl"
    shutil.copy(repo_root / PAIRS, path)
    return path


@pytest.mark.parametrize("kind", ["pairs", "sft", "prompts"])
def test_second_setup_is_served_from_cache(tokenizer, pairs_file, encoder_calls, cache_root, kind):
    first = _setup(tokenizer, kind, str(pairs_file))
    encoded = encoder_calls["n"]
    assert encoded == len(first.train_set) + len(first.val_set) > 0
    assert len(list(cache_root.glob("*.pkl"))) == 1

    second = _setup(tokenizer, kind, str(pairs_file))
    assert encoder_calls["n"] == encoded  # not one more encoder call
    assert second.train_set == first.train_set and second.val_set == first.val_set
    assert second.stats == first.stats
    batch = next(iter(second.train_dataloader()))
    assert batch  # collates like a fresh setup


def test_edited_file_or_changed_option_invalidates(tokenizer, pairs_file, encoder_calls):
    first = _setup(tokenizer, "pairs", str(pairs_file))
    n = encoder_calls["n"]
    rows = pairs_file.read_text().splitlines()
    edited = json.loads(rows[0])
    edited["chosen"] = edited["chosen"] + " (edited)"
    pairs_file.write_text("\n".join([json.dumps(edited), *rows[1:]]) + "\n")
    second = _setup(tokenizer, "pairs", str(pairs_file))
    assert encoder_calls["n"] == 2 * n  # encoded again
    assert second.train_set + second.val_set != first.train_set + first.val_set

    _setup(tokenizer, "pairs", str(pairs_file), max_length=64)  # another max_length: another entry
    assert encoder_calls["n"] == 3 * n
    _setup(tokenizer, "pairs", str(pairs_file), batch_size=2)  # batching does not change examples: a hit
    assert encoder_calls["n"] == 3 * n


def test_changed_chat_template_or_tokenizer_invalidates(tokenizer, pairs_file, encoder_calls):
    _setup(tokenizer, "sft", str(pairs_file))
    n = encoder_calls["n"]
    changed = load_tokenizer("tiny-qwen2")
    changed.chat_template = changed.chat_template.replace("<|im_start|>", "<|im_start|> ")
    _setup(changed, "sft", str(pairs_file))
    assert encoder_calls["n"] == 2 * n
    _setup(load_tokenizer("tiny-llama"), "sft", str(pairs_file))
    assert encoder_calls["n"] == 3 * n


def test_cache_false_always_encodes(tokenizer, pairs_file, encoder_calls, cache_root):
    _setup(tokenizer, "pairs", str(pairs_file), cache=False)
    n = encoder_calls["n"]
    _setup(tokenizer, "pairs", str(pairs_file), cache=False)
    assert encoder_calls["n"] == 2 * n
    assert not cache_root.exists()


def test_cache_hit_replays_the_data_report(tokenizer, tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    rows = [
        {"prompt": "word " * 400, "chosen": "yes", "rejected": "no"},
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    for _ in range(2):
        caplog.clear()
        with caplog.at_level("INFO"):
            dm = _setup(tokenizer, "pairs", str(path), val_fraction=0.0)
        assert dm.stats["train"]["truncated"] == 1
        assert "1 of 2 examples were longer than max_length=128" in caplog.text
    assert "from the data cache" in caplog.text


@pytest.mark.slow
def test_data_prepare_cli_fills_the_cache_for_fit(repo_root, tmp_path, cache_root, pairs_file):
    env_cache = {"RLFT_DATA_CACHE": str(cache_root), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo_root)}

    cmd = [sys.executable, "-m", "rlft", "data", "prepare", "-c", "configs/dpo/tiny.yaml"]
    cmd += ["--data.init_args.path", str(pairs_file)]
    out = subprocess.run(cmd, cwd=repo_root, env={**os.environ, **env_cache}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "64 rows (preference) -> " in out.stdout, out.stdout  # the conversion report, up front
    assert "cached" in out.stdout and str(cache_root) in out.stdout
    entries = list(cache_root.glob("*.pkl"))
    assert len(entries) == 1

    # the same config served by the data module used in training: a hit
    again = subprocess.run(cmd, cwd=repo_root, env={**os.environ, **env_cache}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "already cached" in again.stdout


def test_data_prepare_without_a_config_then_the_data_module_hits(pairs_file, cache_root, encoder_calls, capsys):
    from rlft.cli.data import main as data_main

    data_main(
        [
            "prepare",
            "--data.path",
            str(pairs_file),
            "--model",
            "tiny-qwen2",
            "--kind",
            "pairs",
            "--data.max_length",
            "128",
            "--data.val_fraction",
            "0.2",
            "--data.batch_size",
            "4",
        ]
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("64 rows (preference) -> 64 pairs")  # the conversion report comes first
    assert printed[-1].startswith(f"cached: {cache_root}")
    n = encoder_calls["n"]
    _setup(load_tokenizer("tiny-qwen2"), "pairs", str(pairs_file))  # what `rlft fit` builds from the same options
    assert encoder_calls["n"] == n


def test_data_prepare_refuses_a_disabled_cache(pairs_file):
    from rlft.cli.data import main as data_main

    with pytest.raises(SystemExit, match="--data.cache false leaves nothing to prepare"):
        data_main(
            [
                "prepare",
                "--data.path",
                str(pairs_file),
                "--model",
                "tiny-qwen2",
                "--kind",
                "sft",
                "--data.cache",
                "false",
            ]
        )


class _FirstTokensOnly(PreferenceDataModule):
    """Research code that encodes its own way: it must never be served the base class's cached examples."""

    def _encode_one(self, record: dict) -> dict:
        example = super()._encode_one(record)
        return {**example, "chosen_ids": example["chosen_ids"][:2], "chosen_labels": example["chosen_labels"][:2]}


def test_a_data_module_subclass_gets_its_own_entries(tokenizer, pairs_file, encoder_calls, cache_root):
    base = _setup(tokenizer, "pairs", str(pairs_file))
    n = encoder_calls["n"]
    sub = _FirstTokensOnly(path=str(pairs_file), batch_size=4, max_length=128, val_fraction=0.2)
    sub.attach("pairs", tokenizer).setup("fit")
    assert encoder_calls["n"] == 2 * n
    assert all(len(e["chosen_ids"]) <= 2 for e in sub.train_set) and sub.train_set != base.train_set
    assert len(list(cache_root.glob("*.pkl"))) == 2
