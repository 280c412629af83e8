"""`rlft export` of a reward model keeps its trained head as transformers' `score`, or refuses: never a causal LM
that dropped it with exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from rlft.cli import main as rlft_main
from rlft.export import export_gguf
from rlft.models.model_card import read_front_matter
from rlft.models.reward import RewardScorer, write_reward_folder
from tests.models.test_reward_sequence_classification import LORA, load_sequence_classification, right_padded
from tests.models.test_reward_sequence_classification import trained_like as reward_model_like

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def rlft_folder(tmp_path: Path, head: str) -> Path:
    """An rlft reward folder with the LoRA adapter unmerged: what an mlp head exports as, and what a linear head
    exported as before reward folders became sequence-classification checkpoints."""
    rm = reward_model_like("llama", lora=LORA, head=head)
    write_reward_folder(tmp_path / "rm", rm.model.backbone, rm.model.head, rm.tokenizer, rm.reward_config())
    assert (tmp_path / "rm" / "adapter_config.json").exists()
    return tmp_path / "rm"


def test_export_merged_of_a_reward_folder_keeps_the_trained_head(tmp_path):
    folder = rlft_folder(tmp_path, "linear")
    out = tmp_path / "exported"
    rlft_main(["export", str(folder), "--to", "merged", "--out", str(out)])
    scorer = RewardScorer.from_pretrained(folder)
    ids, mask = right_padded(scorer)
    with torch.no_grad():
        exported = load_sequence_classification(out)(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(exported, scorer.network(ids, mask), atol=1e-5, rtol=0)
    assert transformers.AutoConfig.from_pretrained(out).architectures == ["LlamaForSequenceClassification"]
    meta = read_front_matter(out / "README.md")
    assert meta["library_name"] == "transformers" and "rlft" in meta["tags"]
    assert "Exported by `rlft export`" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="reward model"):  # a causal-LM format would drop the head
        export_gguf(str(folder), tmp_path / "rm.gguf")


def test_export_merged_of_an_mlp_reward_model_fails_and_writes_nothing(tmp_path):
    folder = rlft_folder(tmp_path, "mlp")
    out = tmp_path / "exported"
    result = subprocess.run(
        [sys.executable, "-m", "rlft", "export", str(folder), "--to", "merged", "--out", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr  # a refusal, in one line
    errors = [line for line in result.stderr.splitlines() if "cannot export" in line]
    assert len(errors) == 1 and errors[0].startswith("rlft export: ") and "mlp" in errors[0], result.stderr
    assert not out.exists()


def test_a_reward_model_checkpoint_exports_with_its_trained_head(tmp_path):
    import lightning as L

    from rlft.data import PreferenceDataModule

    L.seed_everything(0)
    rm = reward_model_like("llama", lora=LORA)
    rm.hparams.output_dir = str(tmp_path / "hf")
    data = PreferenceDataModule(
        path=str(REPO / "rlft" / "assets" / "sample_pairs.jsonl"),
        batch_size=4,
        max_length=96,
        val_fraction=0.25,
        seed=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(rm.train(), data)
    trainer.save_checkpoint(tmp_path / "rm.ckpt")
    out = tmp_path / "exported"
    rlft_main(["export", str(tmp_path / "rm.ckpt"), "--to", "merged", "--out", str(out)])
    scorer = RewardScorer.from_pretrained(tmp_path / "hf")  # the end-of-fit folder of the same weights
    ids, mask = right_padded(scorer)
    with torch.no_grad():
        exported = load_sequence_classification(out)(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(exported, scorer.network(ids, mask), atol=1e-5, rtol=0)
