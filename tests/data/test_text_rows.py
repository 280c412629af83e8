"""Plain ``{"text": ...}`` rows (TRL's language-modeling format): detected as format ``text``, trained as SFT on every
token without a chat template (the tokenizer's BOS, an EOS after each document), truncated and packed like other SFT
examples, refused for prompts / pairs / unpaired feedback, bad rows named by file, line and field, and scored by
perplexity over all their tokens; a tiny ``rlft fit`` on such a file learns."""

from __future__ import annotations

import json

import pytest
import torch

from rlft.data import PreferenceDataModule
from rlft.data.encoding import encode_text
from rlft.data.errors import DataError
from rlft.data.formats import FORMATS, convert, detect_format
from rlft.data.kinds import DATA_KINDS
from rlft.data.sources import Row, read_rows
from rlft.logprobs import IGNORE_INDEX
from rlft.models import load_tokenizer
from tests.methods.conftest import cli_fit  # noqa: F401 - the fixture, for the end-to-end run

DOCS = [
    "The river rose overnight and the bridge was closed until noon.",
    "  def add(a, b):\n      return a + b\n",  # leading indentation and line breaks are data: kept as given
    "Bees make honey from the nectar of flowers.",
]


def rows_of(*items: dict, source: str = "docs.jsonl") -> list[Row]:
    return [Row(item, source, index) for index, item in enumerate(items, start=1)]


def write(path, items: list[dict]):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def matching(row: dict) -> list[str]:
    return [name for name, fmt in FORMATS.items() if fmt.matches(row)]


# ---------------------------------------------------------------------------------------------------- detection
def test_text_rows_are_detected_and_become_sft_text_records_unchanged():
    rows = rows_of(*({"text": doc, "url": f"https://example.org/{i}", "id": i} for i, doc in enumerate(DOCS)))
    assert detect_format(rows) == "text"
    records, report = convert(rows, kind="sft")
    assert records == [{"text": doc} for doc in DOCS]  # not stripped, no other field kept
    assert (report.format, report.records_out, report.locations[1]) == ("text", 3, "docs.jsonl:2")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": "plain"}, ["text"]),
        ({"text": "plain", "meta": {"lang": "en"}, "timestamp": "2020"}, ["text"]),  # C4 / Wikipedia style
        # tatsu-lab/alpaca rows carry a rendered 'text' column: they stay Alpaca instruction data
        ({"instruction": "Add.", "input": "1 2", "output": "3", "text": "### Instruction: Add. ..."}, ["alpaca"]),
        ({"messages": [{"role": "user", "content": "hi"}], "text": "hi"}, ["messages"]),
        ({"prompt": "Say hi", "text": "hi"}, ["prompt_only"]),
        ({"text": None, "body": "x"}, []),  # a null column is absent (Parquet / hub rows)
    ],
)
def test_text_is_the_format_of_rows_no_other_format_claims(row, expected):
    assert matching(row) == expected


# ----------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("kind", "advice"),
    [
        ("prompts", "no prompt/answer split"),
        ("pairs", "no chosen/rejected replies"),
        ("unpaired", "no completion labelled true/false"),
    ],
)
def test_kinds_other_than_sft_are_refused_in_one_line_naming_the_file(tmp_path, kind, advice):
    path = write(tmp_path / "corpus.jsonl", [{"text": doc} for doc in DOCS])
    with pytest.raises(DataError) as info:
        convert(read_rows(str(path)), kind=kind)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"corpus.jsonl: format 'text' cannot provide '{kind}' records: plain text rows have ")
    assert advice in message and message.endswith("It provides: sft.")


# ------------------------------------------------------------------------------------------------- invalid rows
def test_bad_and_mixed_rows_are_listed_by_file_line_and_field():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = rows_of({"text": DOCS[0]}, {"text": "   \n"}, {"text": 5}, chat, {"text": None}, {"text": DOCS[2]})
    with pytest.raises(DataError) as info:
        convert(rows, kind="sft")
    message = str(info.value)
    assert message.startswith("docs.jsonl: 4 of 6 rows are invalid as 'text' data for sft")
    assert "docs.jsonl:2: field 'text': is empty (or only whitespace)" in message
    assert "docs.jsonl:3: field 'text': expected a string, found int 5" in message
    assert "docs.jsonl:4: field 'text': missing (or null); expected the document as a string (the row has " in message
    assert "['messages']: a file holds one format" in message
    assert "docs.jsonl:5: field 'text': missing (or null)" in message
    # skip_invalid drops them, counted by reason
    records, report = convert(rows, kind="sft", on_invalid="skip")
    assert records == [{"text": DOCS[0]}, {"text": DOCS[2]}]
    assert report.filtered == {"empty text": 1, "wrong type": 1, "missing field": 2}


def test_a_chat_file_with_a_stray_text_row_names_that_row():
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = rows_of(chat, {"text": DOCS[0]}, {**chat, "id": 2})
    with pytest.raises(DataError, match=r"docs.jsonl:2: field 'messages': missing"):
        convert(rows, kind="sft")
    with pytest.raises(DataError, match="ambiguous: rows match messages, text"):
        detect_format(rows_of(chat, {"text": DOCS[0]}))


# ----------------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_every_token_is_trained_with_the_tokenizers_bos_and_an_eos(name):
    tokenizer = load_tokenizer(name)
    plain = tokenizer(DOCS[0], add_special_tokens=True)["input_ids"]  # what the tokenizer does for plain text
    example = DATA_KINDS["sft"].encode(tokenizer, {"text": DOCS[0]}, max_length=512, max_prompt_length=256)
    assert example["input_ids"] == [*plain, tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"] and not example["truncated"]
    assert (tokenizer.bos_token_id in example["input_ids"]) == (name == "tiny-llama")  # Llama adds BOS, Qwen not
    assert example["input_ids"].count(tokenizer.eos_token_id) == 1


def test_truncation_keeps_the_start_and_drops_the_eos_and_literals_stay_text():
    tokenizer = load_tokenizer("tiny-llama")
    whole = encode_text(tokenizer, DOCS[0])
    cut = encode_text(tokenizer, DOCS[0], max_length=6)
    assert cut.truncated and cut.input_ids == whole.input_ids[:6] and cut.labels == cut.input_ids
    assert tokenizer.eos_token_id not in cut.input_ids  # a cut document does not end there
    # a special-token string written in the text is text, not a real end of document
    literal = encode_text(tokenizer, "The tag <|eot_id|> ends a turn.")
    assert literal.input_ids.count(tokenizer.eos_token_id) == 1 and literal.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(literal.input_ids[1:-1]) == "The tag <|eot_id|> ends a turn."


@pytest.mark.parametrize("packing", [False, True])
def test_batches_train_every_real_token_and_packing_keeps_documents_apart(tmp_path, packing):
    tokenizer = load_tokenizer("tiny-llama")
    path = write(tmp_path / "docs.jsonl", [{"text": doc} for doc in DOCS])
    dm = PreferenceDataModule(
        path=str(path), batch_size=3, max_length=64, val_fraction=0.0, shuffle=False, packing=packing, cache=False
    )
    dm.attach("sft", tokenizer).setup("fit")
    (batch,) = list(dm.train_dataloader())
    expected = [encode_text(tokenizer, doc).input_ids for doc in DOCS]
    if not packing:
        mask = batch.tokens.attention_mask.bool()
        assert [row[m].tolist() for row, m in zip(batch.tokens.input_ids, mask)] == expected
        assert torch.equal(batch.tokens.labels[mask], batch.tokens.input_ids[mask])  # every real token is a label
        assert (batch.tokens.labels[~mask] == IGNORE_INDEX).all()
        return
    assert batch.tokens.input_ids.shape[0] == 1 and batch.tokens.seq_lengths.tolist() == [len(ids) for ids in expected]
    assert batch.tokens.input_ids[0].tolist() == [t for ids in expected for t in ids]
    # positions restart at every document; each ends with EOS; only each document's first label (its "previous
    # token" is the other document's EOS) is ignored
    starts = [0, len(expected[0]), len(expected[0]) + len(expected[1])]
    assert [i for i, p in enumerate(batch.tokens.position_ids[0].tolist()) if p == 0] == starts
    labels = batch.tokens.labels[0].tolist()
    assert [i for i, label in enumerate(labels) if label == IGNORE_INDEX] == starts
    assert all(labels[s - 1] == tokenizer.eos_token_id for s in starts[1:])


# --------------------------------------------------------------------------------------------------- perplexity
def test_perplexity_of_a_text_file_scores_every_token(tmp_path):
    from rlft.eval.data import load_records
    from rlft.eval.perplexity import perplexity
    from rlft.models import load_model

    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", dtype="float32").eval()
    path = write(tmp_path / "held_out.jsonl", [{"text": doc, "source": "wiki"} for doc in DOCS])
    records = load_records(path, kind="sft", on_invalid="error")
    assert records == [{"text": doc} for doc in DOCS]
    result = perplexity(model, tokenizer, records, mode="full")
    # the text's tokens after the first (BOS): the same tokens SFT trains on, without the EOS training appends
    assert result.tokens == sum(len(tokenizer(doc)["input_ids"]) - 1 for doc in DOCS)
    assert result.examples == 3 and 1 < result.perplexity < 2 * len(tokenizer)
    # "assistant" scores what SFT trains, and SFT trains every token of a text
    assistant = perplexity(model, tokenizer, records, mode="assistant")
    assert (assistant.perplexity, assistant.tokens) == (result.perplexity, result.tokens)


# ------------------------------------------------------------------------------------------------------ end to end
def test_tiny_sft_on_a_text_file_through_the_cli_learns(cli_fit, tmp_path):  # noqa: F811
    docs = [
        f"Station {i} reported {10 + i} degrees and light wind from the north. The sky was clear all day."
        for i in range(32)
    ]
    path = write(tmp_path / "corpus.jsonl", [{"text": doc, "id": i} for i, doc in enumerate(docs)])
    metrics = cli_fit(
        "sft",
        "--data.init_args.path",
        str(path),
        "--data.init_args.limit",
        "8",
        "--data.init_args.shuffle",
        "false",
        "--data.init_args.packing",
        "true",
        "--model.init_args.optim.lr",
        "1.0e-2",
        "--trainer.log_every_n_steps",
        "1",
        steps=20,
    )
    losses = metrics.column("train/loss")
    print(f"\nSFT on plain text, tiny CLI: train losses {[round(x, 3) for x in losses]}")
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4
    assert metrics.column("val/loss")  # validation runs through the same path
