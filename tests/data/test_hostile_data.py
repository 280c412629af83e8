"""Hostile or odd data gets one clear message naming file, line and field: never a bare exception, never a silent cut.

Each test is named after what it guards (a hostile-user audit): template strings inside replies, pathological
nesting, huge CSV fields, whole-file reads behind ``data.limit``, conversations with impossible turn orders, CSV line
numbers and Parquet columns of nulls.
"""

from __future__ import annotations

import json
import os
import tracemalloc

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from rlft.data import PreferenceDataModule, datamodule, sources  # noqa: E402
from rlft.data.encoding import encode_completion, encode_pair, encode_prompt, encode_sft  # noqa: E402
from rlft.data.errors import DataError  # noqa: E402
from rlft.data.formats import convert  # noqa: E402
from rlft.data.sources import read_rows  # noqa: E402
from rlft.logprobs import IGNORE_INDEX  # noqa: E402
from rlft.models import load_tokenizer  # noqa: E402

END_OF_TURN = {"tiny-llama": "<|eot_id|>", "tiny-qwen3": "<|im_end|>"}


# ------------------------------------------------------------------ 1. template strings inside contents are text
def _trained(ids: list[int], labels: list[int]) -> list[int]:
    return [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_reply_mentioning_the_end_of_turn_string_is_trained_to_its_end(name):
    tokenizer, eot = load_tokenizer(name), END_OF_TURN[name]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    reply = f"Llama 3 closes a turn with {eot}; the text after it is still the reply."
    messages = [{"role": "user", "content": "How does a turn end?"}, {"role": "assistant", "content": reply}]
    encoded = encode_sft(tokenizer, messages, max_length=512)
    trained = _trained(encoded.input_ids, encoded.labels)
    assert tokenizer.decode(trained) == reply + eot  # the tokens after the literal are in the loss
    assert trained.count(eot_id) == 1 and trained[-1] == eot_id  # the real end-of-turn, once, at the end


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_pairs_and_unpaired_replies_mentioning_the_end_of_turn_string_are_trained_in_full(name):
    tokenizer, eot = load_tokenizer(name), END_OF_TURN[name]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    prompt = [{"role": "user", "content": f"Explain {eot}."}]
    chosen, rejected = f"{eot} marks the end of a turn.", f"I do not know {eot} at all."
    pair = encode_pair(tokenizer, prompt, chosen, rejected, max_length=512)
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        trained = _trained(pair[f"{side}_ids"], pair[f"{side}_labels"])
        assert tokenizer.decode(trained) == text + eot and trained.count(eot_id) == 1
    # the prompt's literal is text too: one real end-of-turn closes the user turn (Llama's template writes it)
    assert pair["prompt_ids"].count(eot_id) == 1
    unpaired = encode_completion(tokenizer, prompt, chosen, max_length=512)
    trained = _trained(unpaired["completion_ids"], unpaired["completion_labels"])
    assert tokenizer.decode(trained) == chosen + eot and trained.count(eot_id) == 1


@pytest.mark.parametrize("name", sorted(END_OF_TURN))
def test_prompt_mentioning_the_end_of_turn_string_does_not_end_the_user_turn(name):
    tokenizer, eot = load_tokenizer(name), END_OF_TURN[name]
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    plain = encode_prompt(tokenizer, [{"role": "user", "content": "What ends a turn?"}])
    literal = encode_prompt(tokenizer, [{"role": "user", "content": f"What does {eot} end?"}])
    assert literal.input_ids.count(eot_id) == plain.input_ids.count(eot_id)
    assert eot in tokenizer.decode(literal.input_ids)  # still there, as text


def test_contents_without_template_strings_encode_exactly_as_the_template_renders():
    tokenizer = load_tokenizer("tiny-qwen3")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4 <not a special>"}]
    encoded = encode_sft(tokenizer, messages, max_length=512)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert encoded.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_data_module_trains_sft_rows_mentioning_the_end_of_turn_string_in_full(tmp_path):
    tokenizer = load_tokenizer("tiny-qwen3")
    eot_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = "Qwen ends turns with <|im_end|> and this sentence is trained."
    path = tmp_path / "tokens.jsonl"
    path.write_text(json.dumps({"prompt": "How do turns end?", "completion": reply}) + "\n", encoding="utf-8")
    module = PreferenceDataModule(str(path), val_fraction=0.0, max_length=128, cache=False).attach("sft", tokenizer)
    module.setup("fit")
    (example,) = module.train_set
    trained = _trained(example["input_ids"], example["labels"])
    assert tokenizer.decode(trained) == reply + "<|im_end|>" and trained.count(eot_id) == 1


class _NoSplitTokenizer:
    """A tokenizer that ignores ``split_special_tokens`` (as some slow or custom tokenizers do)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("split_special_tokens", None)
        return self._tokenizer(text, **kwargs)


def test_tokenizer_that_cannot_encode_the_literal_as_text_refuses_with_a_count_naming_rows(tmp_path):
    tokenizer = _NoSplitTokenizer(load_tokenizer("tiny-llama"))
    rows = [{"prompt": f"Q{i}", "completion": "A <|eot_id|> B" if i % 2 else "Fine."} for i in range(4)]
    path = tmp_path / "literal.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    module = PreferenceDataModule(str(path), val_fraction=0.0, max_length=128, cache=False).attach("sft", tokenizer)
    with pytest.raises(DataError, match=r"2 of 4 examples are unusable: 2 not encodable .*literal.jsonl:2"):
        module.setup("fit")
    module = PreferenceDataModule(str(path), val_fraction=0.0, max_length=128, cache=False, skip_invalid=True)
    module.attach("sft", tokenizer).setup("fit")
    assert len(module.train_set) == 2


# ----------------------------------------------------------------------------------- 2. hostile files, streaming
def test_deeply_nested_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    deep = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + deep + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: JSON nested too deeply"):
        read_rows(str(path))


def test_deeply_nested_json_document_names_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}: JSON nested too deeply"):
        read_rows(str(path))


def test_deeply_nested_csv_cell_names_file_line_and_field(tmp_path):
    path = tmp_path / "deep.csv"
    path.write_text("prompt,completion\nHi,Hello\nHi," + "[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: field 'completion': JSON nested too deeply"):
        read_rows(str(path))


def test_ten_megabyte_csv_field_is_read(tmp_path):
    path = tmp_path / "big.csv"
    path.write_text("prompt,completion\nHi," + "x" * 10_000_000 + "\n", encoding="utf-8")
    (row,) = read_rows(str(path))
    assert len(row.data["completion"]) == 10_000_000 and row.line == 2


def test_csv_field_over_the_limit_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CSV_FIELD_LIMIT", 2**20)
    path = tmp_path / "huge.csv"
    path.write_text("prompt,completion\nHi,Hello\nHi," + "x" * (2**20 + 10) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: a CSV field is larger than 1 MiB"):
        read_rows(str(path))


def test_csv_line_numbers_count_the_header_as_line_one(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nHi,Hello\nBye,\n", encoding="utf-8")
    assert [row.line for row in read_rows(str(path))] == [2, 3]
    with pytest.raises(DataError, match=rf"{path}:3: field 'completion'"):
        convert(read_rows(str(path)), kind="sft")


def _write_large_jsonl(path, lines: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(lines):
            handle.write(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n")


class _CountingRows:
    """Wraps ``iter_rows`` to count the rows the data module actually pulls from the reader."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args, **kwargs):
        for row in sources.iter_rows(*args, **kwargs):
            self.count += 1
            yield row


@pytest.fixture(scope="module")
def large_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "large.jsonl"
    _write_large_jsonl(path, 200_000)
    return path


def _setup(monkeypatch, **options) -> tuple[PreferenceDataModule, _CountingRows, int]:
    counter = _CountingRows()
    monkeypatch.setattr(datamodule, "iter_rows", counter)
    module = PreferenceDataModule(batch_size=2, max_length=64, cache=False, **options)
    module.attach("sft", load_tokenizer("tiny-llama"))
    tracemalloc.start()
    try:
        module.setup("fit")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return module, counter, peak


def test_limit_stops_reading_a_large_file_early(large_file, monkeypatch):
    module, counter, peak = _setup(monkeypatch, path=str(large_file), limit=10, val_fraction=0.05)
    assert len(module.train_set) == 10 and len(module.val_set) == 1
    assert counter.count <= 12 and module.rows_read[str(large_file)] == counter.count
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB for 10 of 200,000 rows"


def test_limit_and_val_limit_with_a_separate_val_path_read_only_what_they_use(large_file, monkeypatch):
    module, counter, _ = _setup(monkeypatch, path=str(large_file), val_path=str(large_file), limit=10, val_limit=5)
    assert (len(module.train_set), len(module.val_set)) == (10, 5)
    assert counter.count == 15


def test_val_limit_with_val_fraction_reads_enough_rows_for_both_splits(large_file, monkeypatch):
    module, counter, _ = _setup(monkeypatch, path=str(large_file), limit=10, val_limit=4, val_fraction=0.1)
    assert (len(module.train_set), len(module.val_set)) == (10, 4)
    assert counter.count <= 45


def test_limit_reads_on_past_invalid_rows(tmp_path, monkeypatch):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "Q", "completion": ""}] * 30 + [{"prompt": f"Q{i}", "completion": "A"} for i in range(200)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    module, counter, _ = _setup(monkeypatch, path=str(path), limit=10, val_fraction=0.0, skip_invalid=True)
    assert len(module.train_set) == 10 and counter.count < len(rows)


# --------------------------------------------------------------------------------- 3. turn order, null columns
def _jsonl(tmp_path, *records) -> str:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _turns(*roles: str) -> dict:
    return {"messages": [{"role": role, "content": f"{role} {i}"} for i, role in enumerate(roles)]}


GOOD = _turns("user", "assistant")


@pytest.mark.parametrize("roles", [("assistant", "user", "assistant"), ("assistant",), ("system", "assistant")])
def test_assistant_first_conversation_names_file_line_and_can_be_skipped(tmp_path, roles):
    path = _jsonl(tmp_path, GOOD, _turns(*roles))
    with pytest.raises(DataError, match=rf"{path}:2: field 'messages': the conversation starts with an assistant"):
        convert(read_rows(path), kind="sft")
    records, report = convert(read_rows(path), kind="sft", on_invalid="skip")
    assert len(records) == 1 and report.filtered == {"assistant turn first": 1}


def test_consecutive_same_role_turns_are_an_error_naming_the_turns(tmp_path):
    path = _jsonl(tmp_path, _turns("user", "user", "assistant", "assistant"), GOOD)
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages': turns 1 and 2 are both 'user'"):
        convert(read_rows(path), kind="sft")
    records, report = convert(read_rows(path), kind="sft", on_invalid="skip")
    assert len(records) == 1 and report.filtered == {"consecutive same-role turns": 1}


def test_sharegpt_and_preference_prompts_follow_the_same_turn_order(tmp_path):
    def sharegpt(*speakers: str) -> dict:
        return {"conversations": [{"from": who, "value": f"{who} {i}"} for i, who in enumerate(speakers)]}

    path = _jsonl(tmp_path, sharegpt("gpt", "human", "gpt"), sharegpt("human", "gpt"))
    assert convert(read_rows(path), kind="sft", on_invalid="skip")[1].filtered == {"assistant turn first": 1}
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    path = _jsonl(
        tmp_path, {"prompt": two_users, "chosen": "c", "rejected": "d"}, {"prompt": "q", "chosen": "c", "rejected": "d"}
    )
    assert convert(read_rows(path), kind="pairs", on_invalid="skip")[1].filtered == {"consecutive same-role turns": 1}


def test_parquet_with_null_columns_says_the_columns_are_empty(tmp_path):
    path = tmp_path / "nulls.parquet"
    table = pa.table({"prompt": pa.array([None, None], pa.string()), "completion": pa.array([None, None], pa.string())})
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"Columns \['completion', 'prompt'\] are null or empty in all of these rows"):
        convert(read_rows(str(path)), kind="sft")
