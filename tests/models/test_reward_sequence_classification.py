"""A reward folder is an `<Arch>ForSequenceClassification` checkpoint that transformers loads with the trained head:
its scores equal rlft's scorer on the same ids, and no folder that would load with a random `score` is written."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlft.export import export_merged  # noqa: E402
from rlft.methods import RewardModel  # noqa: E402
from rlft.models.model_card import read_front_matter  # noqa: E402
from rlft.models.reward import CONFIG_FILE, HeadNotRepresentable, RewardScorer  # noqa: E402

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
CONVERSATIONS = [
    ("What is 2 + 2?", "4"),
    ("Name a colour.", "Blue, like the sky on a clear day."),
    ("Say hi", "Hello! How can I help you today?"),
]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_like(family: str, *, lora: dict | None, head: str = "linear", bias: float = 0.0) -> RewardModel:
    """A reward model whose adapter and head are far from their initial values (as after training)."""
    torch.manual_seed(0)
    rm = RewardModel(f"tiny-{family}", lora=lora, head=head)
    with torch.no_grad():
        for name, param in rm.model.named_parameters():
            if "lora_B" in name or (lora is None and "layers.1.mlp" in name):
                param.add_(torch.randn_like(param) * 0.05)
        for param in rm.model.head.parameters():
            param.normal_(std=0.1)
        if head == "linear":
            rm.model.head.bias.fill_(bias)
    return rm.eval()


def right_padded(scorer: RewardScorer) -> tuple[torch.Tensor, torch.Tensor]:
    """The conversations encoded as rlft encodes them, right-padded into one batch."""
    sequences = [scorer.encode(p, c) for p, c in CONVERSATIONS]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), scorer.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    assert len({len(s) for s in sequences}) > 1  # some rows really are padded
    return ids, mask


def load_sequence_classification(folder) -> torch.nn.Module:
    model, report = transformers.AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not report["missing_keys"] and not report["mismatched_keys"], report  # no freshly initialised score
    return model.eval()


def assert_same_scores(folder, rm: RewardModel) -> float:
    scorer = RewardScorer.from_pretrained(folder)
    ids, mask = right_padded(scorer)
    with torch.no_grad():
        hf = load_sequence_classification(folder)(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = scorer.network(ids, mask)
        trained = rm.model(ids, mask)
    assert hf.abs().min() > 1e-3  # the head is not a zero head whose scores would agree trivially
    torch.testing.assert_close(hf, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=0)
    return (hf - trained).abs().max().item()


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_linear_head_folder_loads_in_transformers_with_the_trained_score(tmp_path, lora):
    rm = trained_like("llama", lora=lora)
    rm.export(tmp_path / "rm")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "rm")
    assert config.architectures == ["LlamaForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == rm.tokenizer.pad_token_id
    assert not (tmp_path / "rm" / "adapter_config.json").exists()  # an adapter would load its base, random score
    reward_config = json.loads((tmp_path / "rm" / CONFIG_FILE).read_text())
    assert reward_config["backbone"] == ("merged" if lora else "full")
    print(f"max |transformers - rlft| ({'lora' if lora else 'full'}): {assert_same_scores(tmp_path / 'rm', rm):.2e}")
    meta = read_front_matter(tmp_path / "rm" / "README.md")
    assert meta["library_name"] == "transformers" and "reward-model" in meta["tags"]


def test_a_bias_is_folded_into_a_final_norm_bias_exactly(tmp_path):
    rm = trained_like("gpt2", lora=LORA, bias=0.7)  # GPT-2's ln_f has a bias to carry it
    rm.export(tmp_path / "rm")
    print(f"max |transformers - rlft| (gpt2, bias folded): {assert_same_scores(tmp_path / 'rm', rm):.2e}")


@pytest.mark.parametrize(("head", "bias"), [("mlp", 0.0), ("linear", 0.7)], ids=["mlp", "llama-bias"])
def test_a_head_transformers_cannot_hold_gets_the_rlft_folder_and_a_note(tmp_path, head, bias):
    rm = trained_like("llama", lora=LORA, head=head, bias=bias)
    rm.export(tmp_path / "rm")
    folder = tmp_path / "rm"
    assert json.loads((folder / CONFIG_FILE).read_text())["format"] == "rlft"
    assert not (folder / "config.json").exists() or "SequenceClassification" not in (folder / "config.json").read_text()
    card = (folder / "README.md").read_text()
    assert "freshly initialised `score`" in card and "RewardScorer" in card
    scorer = RewardScorer.from_pretrained(folder)  # rlft's own folder loads as before
    ids, mask = right_padded(scorer)
    with torch.no_grad():
        torch.testing.assert_close(scorer.network(ids, mask), rm.model(ids, mask), atol=1e-5, rtol=0)
    with pytest.raises(HeadNotRepresentable, match="nothing written"):
        export_merged(str(folder), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_a_sharded_runs_adapter_only_twin_still_exports_the_merged_checkpoint(tmp_path):
    rm = trained_like("llama", lora=LORA)
    trained = {n: p.detach().clone() for n, p in rm.model.named_parameters() if p.requires_grad}
    twin = rm.unsharded_copy(trained)  # what rank 0 exports after ZeRO/FSDP: the frozen base on the meta device
    assert any(p.is_meta for p in twin.parameters())
    rm.export(tmp_path / "rm", twin)
    assert_same_scores(tmp_path / "rm", rm)
