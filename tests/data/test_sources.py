"""Readers for JSONL/JSON(.gz)/CSV/Parquet files, directories, saved datasets and (mocked) hub datasets."""

from __future__ import annotations

import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from rlft.data.errors import DataError  # noqa: E402
from rlft.data.formats import convert  # noqa: E402
from rlft.data.sources import Row, read_rows  # noqa: E402

ITEMS = [
    {"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Sky colour?", "chosen": "Blue", "rejected": "Green"},
]


def test_jsonl_lines_count_blank_lines(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(f"{json.dumps(ITEMS[0])}\n\n   \n{json.dumps(ITEMS[1])}\n{json.dumps(ITEMS[2])}", encoding="utf-8")
    rows = read_rows(str(path))
    assert rows == [Row(ITEMS[0], str(path), 1), Row(ITEMS[1], str(path), 4), Row(ITEMS[2], str(path), 5)]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.json.gz"])
def test_gzip_jsonl(tmp_path, name) -> None:
    path = tmp_path / name
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(item) for item in ITEMS) + "\n")
    rows = read_rows(str(path))
    assert [r.data for r in rows] == ITEMS and [r.line for r in rows] == [1, 2, 3]


def test_json_array_and_wrapped_array(tmp_path) -> None:
    plain = tmp_path / "a.json"
    plain.write_text(json.dumps(ITEMS, indent=2), encoding="utf-8")
    wrapped = tmp_path / "b.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ITEMS}), encoding="utf-8")
    for path in (plain, wrapped):
        rows = read_rows(str(path))
        assert [r.data for r in rows] == ITEMS and [r.line for r in rows] == [1, 2, 3]
        assert rows[0].source == str(path)
    packed = tmp_path / "c.json.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        json.dump(ITEMS, handle)
    assert [r.data for r in read_rows(str(packed))] == ITEMS


def test_malformed_json_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + '\n{"prompt": "Hi", "chosen": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON \(Expecting value at column 28\)"):
        read_rows(str(path))
    array = tmp_path / "broken.json"
    array.write_text('[\n {"a": 1},\n {"a": 2,}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{array}:3: malformed JSON"):
        read_rows(str(array))


def test_rows_must_be_objects(tmp_path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object .* found list"):
        read_rows(str(path))
    array = tmp_path / "strings.json"
    array.write_text('[{"a": 1}, "x"]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{array}:2: expected a JSON object .* found str"):
        read_rows(str(array))


def test_csv_rows_and_json_cells(tmp_path) -> None:
    path = tmp_path / "piqa.csv"
    path.write_text(
        "goal,sol1,sol2,label\n"
        'Open a jar,"Run it under hot water,\nthen twist",Hit it with a hammer,0\n'
        "Cool soup,Put it in the oven,Blow on it,1\n",
        encoding="utf-8",
    )
    rows = read_rows(str(path))
    # the header is line 1 and a quoted cell spans lines 2-3: lines are where an editor shows each row
    assert [r.line for r in rows] == [2, 4]
    assert rows[0].data == {
        "goal": "Open a jar",
        "sol1": "Run it under hot water,\nthen twist",
        "sol2": "Hit it with a hammer",
        "label": "0",
    }
    records, report = convert(rows, kind="pairs")
    assert report.format == "piqa"
    assert [(r["chosen"], r["rejected"]) for r in records] == [
        ("Run it under hot water,\nthen twist", "Hit it with a hammer"),
        ("Blow on it", "Put it in the oven"),
    ]
    messages = tmp_path / "chat.csv"
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    messages.write_text('messages,note\n"' + json.dumps(convo).replace('"', '""') + '",[not json\n', encoding="utf-8")
    row = read_rows(str(messages))[0]
    assert row.data == {"messages": convo, "note": "[not json"}


def test_csv_with_too_many_cells(tmp_path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\nHi,Hello\nA,B,C\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: CSV row has 3 cells but the header has 2"):
        read_rows(str(path))


def test_parquet_rows(tmp_path) -> None:
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(ITEMS), path)
    rows = read_rows(str(path))
    assert rows == [Row(item, str(path), index) for index, item in enumerate(ITEMS, start=1)]
    records, report = convert(rows, kind="pairs")
    assert report.summary() == "prefs.parquet: 3 rows (preference) -> 3 pairs"
    assert records[1] == {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"}


def test_parquet_with_message_lists(tmp_path) -> None:
    path = tmp_path / "chat.parquet"
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pq.write_table(pa.Table.from_pylist([{"messages": convo}]), path)
    records, _ = convert(read_rows(str(path)), kind="sft")
    assert records == [{"messages": convo}]


def test_directory_of_files_and_splits(tmp_path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "b.jsonl").write_text(json.dumps(ITEMS[1]) + "\n", encoding="utf-8")
    (tmp_path / "plain" / "a.json").write_text(json.dumps([ITEMS[0]]), encoding="utf-8")
    (tmp_path / "plain" / "README.md").write_text("not data", encoding="utf-8")
    rows = read_rows(str(tmp_path / "plain"))
    assert [r.data for r in rows] == ITEMS[:2]  # sorted by file name, README ignored
    assert [r.source.rsplit("/", 1)[1] for r in rows] == ["a.json", "b.jsonl"]

    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text(json.dumps(ITEMS[0]) + "\n", encoding="utf-8")
    (split / "val.jsonl").write_text(json.dumps(ITEMS[1]) + "\n", encoding="utf-8")
    (split / "test-00000.jsonl").write_text(json.dumps(ITEMS[2]) + "\n", encoding="utf-8")
    assert [r.data for r in read_rows(str(split))] == [ITEMS[0]]
    assert [r.data for r in read_rows(str(split), split="validation")] == [ITEMS[1]]
    assert [r.data for r in read_rows(str(split), split="test")] == [ITEMS[2]]
    with pytest.raises(DataError, match="no files for split 'holdout'; files exist for splits: test, train, valid"):
        read_rows(str(split), split="holdout")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no data files"):
        read_rows(str(tmp_path / "empty"))


def test_saved_datasets(tmp_path) -> None:
    single = tmp_path / "single"
    datasets.Dataset.from_list(ITEMS).save_to_disk(str(single))
    rows = read_rows(str(single))
    assert [r.data for r in rows] == ITEMS and [r.line for r in rows] == [1, 2, 3]
    assert rows[0].source == f"{single}[train]"

    several = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ITEMS[:2]), "test": datasets.Dataset.from_list(ITEMS[2:])}
    ).save_to_disk(str(several))
    assert [r.data for r in read_rows(str(several), split="test")] == ITEMS[2:]
    records, report = convert(read_rows(str(several)), kind="pairs")
    assert report.records_out == 2 and records[0]["chosen"] == "Hello"
    with pytest.raises(DataError, match="no split 'validation'; available: train, test"):
        read_rows(str(several), split="validation")


def test_hub_dataset_via_load_dataset(monkeypatch) -> None:
    calls = []

    def fake_load_dataset(name, subset=None, *, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list(ITEMS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_rows("someone/prefs", split="test", subset="clean")
    assert calls == [("someone/prefs", "clean", "test")]
    assert rows[2] == Row(ITEMS[2], "someone/prefs[test]", 3)


def test_unreachable_hub_says_to_use_a_local_file(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        read_rows("someone/prefs")
    message = str(info.value)
    assert "someone/prefs" in message and "ConnectionError" in message and "local" in message


@pytest.mark.parametrize("path", ["data/missing.jsonl", "./nothing/here", "/tmp/rlft-no-such-dir/x.csv", "a/b/c"])
def test_missing_local_file(monkeypatch, path) -> None:
    def never(*args, **kwargs):
        raise AssertionError("a local-looking path must not go to the hub")

    monkeypatch.setattr(datasets, "load_dataset", never)
    with pytest.raises(DataError, match=rf"{path}: file not found"):
        read_rows(path)


def test_unsupported_and_undecodable_files(tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes.txt: unsupported file type; use one of .jsonl"):
        read_rows(str(text))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl: not UTF-8 text"):
        read_rows(str(latin))
    fake_gz = tmp_path / "fake.jsonl.gz"
    fake_gz.write_text("plain text", encoding="utf-8")
    with pytest.raises(DataError, match=r"fake.jsonl.gz: corrupt gzip file"):
        read_rows(str(fake_gz))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad.parquet: cannot read Parquet file"):
        read_rows(str(bad_parquet))


def test_json_object_keyed_by_split(tmp_path) -> None:
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": ITEMS[:2], "test": ITEMS[2:]}), encoding="utf-8")
    assert [r.data for r in read_rows(str(path))] == ITEMS[:2]
    assert [r.data for r in read_rows(str(path), split="test")] == ITEMS[2:]
    with pytest.raises(DataError, match="no list for split 'validation'; it has: train, test"):
        read_rows(str(path), split="validation")
    # A single record whose only list is its own field is one row, not a wrapper.
    single = tmp_path / "one.json"
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    single.write_text(json.dumps(record), encoding="utf-8")
    assert read_rows(str(single)) == [Row(record, str(single), 1)]
