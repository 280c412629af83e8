"""Every exported folder carries a README.md model card: Hugging Face metadata the hub reads, and a body that says
what was trained on which data (files with sha256 and row counts), for how many steps, to which metrics."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlft.cli import main as rlft_main
from rlft.models.model_card import CardFacts, DataFile, card_text, parse_front_matter, read_front_matter

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SFT_DATA = REPO / "rlft" / "assets" / "sample_sft.jsonl"


def _fit_sft(tmp_path: Path, steps: int = 2) -> Path:
    config = (REPO / "configs" / "sft" / "tiny.yaml").read_text().replace("rlft/assets/", f"{REPO}/rlft/assets/")
    (tmp_path / "config.yaml").write_text(config)
    cmd = [
        sys.executable,
        "-m",
        "rlft",
        "fit",
        "-c",
        str(tmp_path / "config.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--model.output_dir",
        str(tmp_path / "hf"),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path / "hf"


def _split_sizes() -> tuple[int, int]:
    """Train and validation rows of the tiny config's data, split as the fit split them."""
    import yaml

    from rlft.data import PreferenceDataModule
    from rlft.models import load_tokenizer

    config = yaml.safe_load((REPO / "configs" / "sft" / "tiny.yaml").read_text())
    args = {**config["data"]["init_args"], "path": str(SFT_DATA)}
    datamodule = PreferenceDataModule(**args, seed=config["seed_everything"])
    datamodule.attach("sft", load_tokenizer(config["model"]["init_args"]["model"]))
    datamodule.setup("fit")
    return len(datamodule.train_set), len(datamodule.val_set)


def test_fit_writes_a_card_with_metadata_data_hashes_steps_and_metrics(tmp_path):
    folder = _fit_sft(tmp_path)
    card = folder / "README.md"
    text = card.read_text()
    meta = read_front_matter(card)  # parses as YAML
    assert meta["base_model"] == "tiny-llama" and meta["library_name"] == "peft"
    assert meta["tags"][:2] == ["rlft", "sft"] and "datasets" not in meta  # a local file is no hub data set
    sha = hashlib.sha256(SFT_DATA.read_bytes()).hexdigest()
    train_rows, val_rows = _split_sizes()
    assert f"| `{SFT_DATA}` | train | {train_rows} | `{sha}` |" in text
    assert f"| `{SFT_DATA}` | validation | {val_rows} | `{sha}` |" in text
    assert "Steps trained: 2" in text and "`val/loss`" in text and "`train/loss`" in text
    assert "| `optim.lr` | 0.001 |" in text and "| `lora.r` | 8 |" in text
    assert "AutoPeftModelForCausalLM.from_pretrained" in text
    assert "TODO" not in text and "[More Information Needed]" not in text  # peft's empty template is gone

    # `rlft export` carries the run's facts over, with the new folder's library and loading snippet
    out = tmp_path / "merged"
    rlft_main(["export", str(folder), "--to", "merged", "--out", str(out)])
    exported = (out / "README.md").read_text()
    meta = read_front_matter(out / "README.md")
    assert meta["library_name"] == "transformers" and meta["base_model"] == "tiny-llama"
    assert f"`{sha}`" in exported and "Steps trained: 2" in exported
    assert "AutoModelForCausalLM.from_pretrained" in exported and "AutoPeft" not in exported


@pytest.mark.parametrize(
    ("base", "expected"),
    [("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B")],
)
def test_front_matter_names_hub_ids_datasets_and_a_known_license(base, expected):
    facts = CardFacts(
        base_model=base,
        method="DPO",
        usage="peft",
        settings={"beta": 0.1, "lora": {"r": 16}},
        data=[DataFile("Anthropic/hh-rlhf", "train", 160800)],
    )
    meta = parse_front_matter(card_text(facts))
    assert meta["base_model"] == expected and meta["tags"] == ["rlft", "dpo"]
    assert meta["datasets"] == ["Anthropic/hh-rlhf"] and meta["library_name"] == "peft"
    assert meta.get("license") == ("apache-2.0" if base.startswith("smollm2") else None)


def test_a_model_without_a_run_card_gets_a_card_that_claims_no_training(tmp_path):
    from rlft.export import export_merged

    out = export_merged("tiny-llama", tmp_path / "merged")
    text = (out / "README.md").read_text()
    meta = read_front_matter(out / "README.md")
    assert meta["base_model"] == "tiny-llama" and meta["library_name"] == "transformers"
    assert "Written by rlft" in text and "Trained with" not in text and "AutoModelForCausalLM" in text
