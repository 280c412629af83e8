"""The ``unpaired`` data kind (KTO's {prompt, completion, label} rows): detection, validation, collation, and SFT
refusing such rows instead of training the undesirable completions as targets."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlft.data import PreferenceDataModule  # noqa: E402
from rlft.data.collate import Collator  # noqa: E402
from rlft.data.errors import DataError  # noqa: E402
from rlft.data.formats import FORMATS, KINDS, convert, detect_format  # noqa: E402
from rlft.data.kinds import DATA_KINDS  # noqa: E402
from rlft.data.sources import Row  # noqa: E402
from rlft.logprobs import IGNORE_INDEX  # noqa: E402
from rlft.models import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "rlft" / "assets" / "sample_unpaired.jsonl"


def rows_of(*items: dict) -> list[Row]:
    return [Row(item, "fb.jsonl", index) for index, item in enumerate(items, start=1)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def write(path: Path, *rows: dict) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GOOD = {"prompt": "2 + 2?", "completion": "4", "label": True}
BAD = {"prompt": "2 + 2?", "completion": "5", "label": False}


# ------------------------------------------------------------------------------------------------ detection
def test_label_key_makes_rows_unpaired_and_only_unpaired():
    assert "unpaired" in KINDS and "unpaired" in DATA_KINDS
    assert detect_format(rows_of(GOOD, BAD)) == "unpaired"
    assert [name for name, fmt in FORMATS.items() if fmt.matches(GOOD)] == ["unpaired"]
    # without label the same keys are SFT data, as before
    plain = {"prompt": "2 + 2?", "completion": "4"}
    assert [name for name, fmt in FORMATS.items() if fmt.matches(plain)] == ["prompt_completion"]


def test_unpaired_records_from_strings_and_message_lists():
    prompt = [{"role": "system", "content": "Terse."}, user("1+1")]
    conversational = {
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": " 2 "}],
        "label": False,
        "score": 0.25,
    }
    records, report = convert(rows_of(GOOD, conversational), kind="unpaired")
    assert report.format == "unpaired" and report.records_out == 2
    assert records == [
        {"prompt": [user("2 + 2?")], "completion": "4", "label": True},
        {
            "prompt": [{"role": "system", "content": "Terse."}, user("1+1")],
            "completion": "2",
            "label": False,
            "score": 0.25,
        },
    ]
    assert all(type(r["label"]) is bool for r in records)


@pytest.mark.parametrize("label", [1, 0, "true", "False", "1", 1.0, [True]])
def test_label_must_be_a_json_boolean(label):
    with pytest.raises(DataError) as info:
        convert(rows_of(GOOD, {**BAD, "label": label}), kind="unpaired")
    message = str(info.value)
    assert "fb.jsonl:2: field 'label': expected a JSON boolean true or false" in message
    assert "1 of 2 rows are invalid as 'unpaired'" in message


def test_other_field_errors_name_file_line_and_field():
    with pytest.raises(DataError, match=r"fb.jsonl:1: field 'completion': is empty"):
        convert(rows_of({**GOOD, "completion": "  "}), kind="unpaired", format="unpaired")
    with pytest.raises(DataError, match=r"fb.jsonl:1: field 'label': missing; expected true"):
        convert(rows_of({**GOOD, "label": None}), kind="unpaired", format="unpaired")
    with pytest.raises(DataError, match=r"field 'kl_input_ids': is a name rlft uses for the tokenised example"):
        convert(rows_of({**GOOD, "kl_input_ids": [1]}), kind="unpaired")


def test_pair_methods_and_formats_without_labels_refuse_the_kind():
    with pytest.raises(DataError, match="format 'unpaired' cannot provide 'pairs' records: each row has one"):
        convert(rows_of(GOOD, BAD), kind="pairs")
    with pytest.raises(DataError, match="format 'prompt_completion' cannot provide 'unpaired'.*label: true|false"):
        convert(rows_of({"prompt": "a", "completion": "b"}), kind="unpaired")
    records, _ = convert(rows_of(GOOD), kind="prompts")  # online RL may take the prompts
    assert records == [{"prompt": [user("2 + 2?")], "completion": "4", "label": True}]


# ------------------------------------------------------------------------------------------------ SFT refuses
def _refusal_of(path: str, **data) -> str:
    module = PreferenceDataModule(path=path, val_fraction=0.0, cache=False, **data)
    with pytest.raises(DataError) as info:
        module.attach("sft", load_tokenizer("tiny-llama")).setup()
    return str(info.value)


def test_sft_refuses_unpaired_rows_naming_file_field_and_kto(tmp_path):
    message = _refusal_of(write(tmp_path / "kto.jsonl", GOOD, BAD))
    assert "kto.jsonl" in message and "'label'" in message and "rlft.methods.KTO" in message
    assert "NOT to imitate" in message


def test_sft_refuses_labelled_rows_under_any_format_and_skip_invalid(tmp_path):
    plain = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    mixed = write(tmp_path / "mixed.jsonl", *plain, BAD)  # detected as prompt_completion by majority
    message = _refusal_of(mixed, skip_invalid=True)
    assert "mixed.jsonl:6: field 'label': 1 of 6 rows" in message and "rlft.methods.KTO" in message
    explicit = write(tmp_path / "kto.jsonl", GOOD, BAD)
    message = _refusal_of(explicit, format="prompt_completion")
    assert "kto.jsonl:1: field 'label': 2 of 2 rows" in message and "rlft.methods.KTO" in message


def test_sft_method_fails_at_start_on_unpaired_data(tmp_path):
    import lightning as L

    from rlft.methods import SFT

    data = PreferenceDataModule(path=write(tmp_path / "kto.jsonl", GOOD, BAD), val_fraction=0.0, cache=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(DataError, match=r"kto\.jsonl.*'label'.*rlft\.methods\.KTO"):
        trainer.fit(SFT("tiny-llama", lora=None), data)
    assert trainer.global_step == 0


# ------------------------------------------------------------------------------------------------ batches
@pytest.fixture(scope="module")
def unpaired_set():
    data = PreferenceDataModule(path=str(SAMPLE), val_fraction=0.0, max_length=64, cache=False, shuffle=False)
    data.attach("unpaired", load_tokenizer("tiny-llama")).setup()
    return data


def test_sample_data_is_one_desirable_and_one_undesirable_row_per_pair(unpaired_set):
    labels = [e["label"] for e in unpaired_set.train_set]
    assert len(labels) == 128 and sum(labels) == 64


def test_collated_unpaired_batch(unpaired_set):
    examples = unpaired_set.train_set[:5]
    for i, example in enumerate(examples):
        example["weight"] = float(i)  # an own numeric field reaches the batch as a [B] float tensor
    batch = Collator("unpaired", unpaired_set.tokenizer.pad_token_id)(examples)
    for example in examples:
        del example["weight"]
    n = len(examples)
    assert batch.label.dtype == torch.bool and batch.label.tolist() == [e["label"] for e in examples]
    assert batch.field("weight").dtype == torch.float32 and batch.field("weight").tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert batch.prompt_lengths.tolist() == [len(e["prompt_ids"]) for e in examples]
    assert batch.tokens.input_ids.shape == batch.kl_tokens.input_ids.shape == batch.tokens.labels.shape
    for i, e in enumerate(examples):
        length = len(e["prompt_ids"]) + len(e["completion_ids"])
        assert batch.tokens.input_ids[i, :length].tolist() == e["prompt_ids"] + e["completion_ids"]
        assert batch.tokens.attention_mask[i].sum() == length  # right-padded
        trained = batch.tokens.labels[i] != IGNORE_INDEX
        assert batch.tokens.labels[i, trained].tolist() == [t for t in e["completion_labels"] if t != IGNORE_INDEX]
        assert not trained[: len(e["prompt_ids"])].any()
        # the KL row: this prompt, the previous row's completion (TRL's shift by one)
        other = examples[(i - 1) % n]
        kl_length = int(batch.kl_tokens.attention_mask[i].sum())
        expected = e["prompt_ids"] + other["completion_ids"]
        assert batch.kl_tokens.input_ids[i, :kl_length].tolist() == expected[-kl_length:]
        kl_trained = batch.kl_tokens.labels[i] != IGNORE_INDEX
        assert int(kl_trained.sum()) == sum(t != IGNORE_INDEX for t in other["completion_labels"])


def test_long_mismatched_rows_are_cut_to_the_batch_width(unpaired_set):
    short, long = dict(unpaired_set.train_set[0]), dict(unpaired_set.train_set[1])
    long["prompt_ids"] = long["prompt_ids"] * 3  # a long prompt whose KL row takes the other completion
    short["completion_ids"] = short["completion_labels"] = short["completion_ids"] * 4
    batch = Collator("unpaired", 0, pad_to_multiple_of=8)([short, long])
    width = max(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in (short, long))
    assert batch.kl_tokens.attention_mask.sum(-1).max() <= width and batch.tokens.input_ids.shape[1] % 8 == 0
    assert (batch.kl_tokens.labels != IGNORE_INDEX).any(-1).all()  # every KL row keeps completion tokens


def test_unpaired_data_is_not_packed(tmp_path):
    data = PreferenceDataModule(path=str(SAMPLE), packing=True, cache=False)
    with pytest.raises(DataError, match="packing: true is not possible for unpaired data"):
        data.attach("unpaired", load_tokenizer("tiny-llama")).setup()
