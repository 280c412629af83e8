"""``rlft label`` commands, file import validation, export rules, win-rates and the schema version check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text

from rlft.cli.label import main
from rlft.label import queries, store
from rlft.label.db import SCHEMA_VERSION, SchemaVersionError, normalise_url, open_database
from rlft.label.export import build_pairs, decide, win_rates
from rlft.label.importing import ImportValidationError, load_generations, load_pairs


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        (["a"], ("a", "ok")),
        (["a", "a", "b"], ("a", "ok")),
        (["b", "tie"], ("b", "ok")),  # agreement 1/2 == default threshold 0.5 -> kept
        (["a", "tie", "tie"], (None, "low_agreement")),  # 1/3 < 0.5
        (["tie", "tie"], (None, "all_ties")),
        (["a", "b"], (None, "split")),
        (["a", "b", "tie"], (None, "split")),
    ],
)
def test_export_rules(votes, expected):
    assert decide(votes) == expected


def test_export_rules_thresholds():
    assert decide(["a"], min_votes=2) == (None, "too_few_votes")
    assert decide(["a", "a", "b"], min_agreement=0.7) == (None, "low_agreement")


def _vote(example_id, labeler, choice, model_a="x", model_b="y"):
    return queries.Vote(example_id, labeler, choice, "left", False, 3, 1.0, model_a, model_b)


def test_win_rates_hand_computed():
    votes = [
        _vote(1, "u", "a"),
        _vote(1, "v", "a"),
        _vote(1, "w", "b"),  # x wins (2-1)
        _vote(2, "u", "b"),  # y wins
        _vote(3, "u", "tie"),  # tie
        _vote(4, "u", "a", "y", "x"),
        _vote(4, "v", "a", "y", "x"),  # stored A is y: y wins
        _vote(5, "u", "a"),
        _vote(5, "v", "b"),  # a/b split -> tie
        _vote(6, "u", "a", "x", "x"),  # same model on both sides: not a comparison
        _vote(7, "u", "a"),
        _vote(7, "v", "tie"),  # majority over non-tie votes (as in export): x wins
    ]
    (result,) = win_rates(votes)
    assert (result["model_x"], result["model_y"], result["items"]) == ("x", "y", 6)
    assert (result["wins_x"], result["wins_y"], result["ties"]) == (2, 2, 2)
    # scores for x: 1, 0, 0.5, 0, 0.5, 1 -> mean 0.5 ; decisive 2/4
    assert result["win_rate_x"] == pytest.approx(0.5)
    assert result["decisive_win_rate_x"] == pytest.approx(0.5)
    # normal CI: scores' sample sd = sqrt((2*0.25 + 2*0.25 + 0 + 0) / 5) = sqrt(0.2)
    half = 1.96 * (0.2**0.5) / 6**0.5
    assert result["win_rate_x_ci95"] == pytest.approx([0.5 - half, 0.5 + half])


def test_build_pairs_uses_stored_orientation():
    examples = {
        1: {
            "prompt": [{"role": "user", "content": "p"}],
            "response_a": "A1",
            "response_b": "B1",
            "model_a": "x",
            "model_b": "y",
        },
        2: {
            "prompt": [{"role": "user", "content": "q"}],
            "response_a": "A2",
            "response_b": "B2",
            "model_a": "x",
            "model_b": "y",
        },
    }
    pairs, summary = build_pairs([_vote(1, "u", "b"), _vote(2, "u", "tie")], examples, with_metadata=True)
    assert pairs == [
        {
            "prompt": [{"role": "user", "content": "p"}],
            "chosen": "B1",
            "rejected": "A1",
            "example_id": 1,
            "votes": {"b": 1},
            "agreement": 1.0,
            "chosen_model": "y",
        }
    ]
    assert summary.as_dict() == {
        "written": 1,
        "unlabeled": 0,
        "too_few_votes": 0,
        "all_ties": 1,
        "split": 0,
        "low_agreement": 0,
    }


def test_load_pairs_reports_file_line_field(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            {"prompt": "ok", "response_a": "a", "response_b": "b"},
            {"prompt": [{"role": "robot", "content": "x"}], "response_a": "a", "response_b": "b"},
            {"prompt": "p", "response_b": "b"},
            "{broken",
            {"prompt": "p", "response_a": "a", "response_b": "b", "category": 5},
        ],
    )
    with pytest.raises(ImportValidationError) as info:
        load_pairs(path)
    errors = info.value.errors
    assert len(errors) == 4
    assert errors[0].startswith(f"{path}:2: prompt[0]: expected")
    assert errors[1] == f"{path}:3: response_a: missing (keys present: ['prompt', 'response_b'])"
    assert errors[2].startswith(f"{path}:4: not valid JSON")
    assert errors[3] == f"{path}:5: category: expected a string, got int"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_generations_pair_repeated_prompts_in_order(tmp_path):
    a = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "p", "completion": f"a{i}"} for i in range(3)])
    b = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p", "response": f"b{i}"} for i in range(2)])
    joined = load_generations(a, b)
    assert [(r.response_a, r.response_b, r.model_a, r.model_b) for r in joined.records] == [
        ("a0", "b0", "small", "big"),
        ("a1", "b1", "small", "big"),
    ]
    assert (joined.unmatched_a, joined.unmatched_b) == (1, 0)
    assert joined.notes == [f"{a}:3: no generation for this prompt in file B"]


def test_cli_full_workflow(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": f"q{i}", "response_a": f"good{i}", "response_b": f"bad{i}", "model_a": "m1", "model_b": "m2"}
            for i in range(4)
        ],
    )
    main(["import", "--db", db, "--pairs", str(pairs), "--overlap", "2"])
    assert "imported 4, already present 0" in capsys.readouterr().out
    gen_a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "g", "completion": "ga"}, {"prompt": "h", "completion": "x"}])
    gen_b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "g", "completion": "gb"}])
    main(["import", "--db", db, "--generations", str(gen_a), str(gen_b), "--model-a", "m1", "--model-b", "m2"])
    assert "unmatched prompts: 1 in A, 0 in B" in capsys.readouterr().out

    main(["add-labeler", "--db", db, "ann"])
    token = capsys.readouterr().out.strip().splitlines()[-1]
    main(["add-labeler", "--db", db, "ben", "--token", "ben-secret"])
    capsys.readouterr()
    engine = open_database(db)
    ann, ben = store.authenticate(engine, token), store.authenticate(engine, "ben-secret")
    # ann always picks the "good" response; ben agrees except on q3; nobody labels g.
    for who in (ann, ben):
        while (task := store.claim_next(engine, who.id)) is not None:
            if task.prompt[0]["content"] == "g":
                break
            good_left = task.response_a.startswith("good")
            pick_good = who is ann or task.prompt[0]["content"] != "q3"
            choice = "a" if good_left == pick_good else "b"
            store.submit_preference(engine, who.id, task.assignment_id, choice, confidence=4)

    out = tmp_path / "out" / "pairs.jsonl"
    main(["export", "--db", db, "--out", str(out), "--winrate", str(tmp_path / "wr.json")])
    printed = capsys.readouterr().out
    assert "wrote 3 pairs" in printed and "split=1" in printed and "never labeled: 1" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["chosen"] for r in rows] == ["good0", "good1", "good2"]
    assert all(r["rejected"].startswith("bad") and r["prompt"][0]["role"] == "user" for r in rows)
    assert json.loads((tmp_path / "wr.json").read_text())[0]["wins_x"] == 3

    main(["stats", "--db", db])
    printed = capsys.readouterr().out
    assert "Fleiss' kappa" in printed and "| ann | 4 |" in printed
    main(["stats", "--db", db, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["quality"]["votes"] == 8 and report["overview"]["examples"] == 5
    # ann and ben agree on 3 of 4 items: [a,a,a,a] vs [a,a,a,b] in stored terms -> kappa 0 (p_e = p_o = 3/4)
    assert report["quality"]["pairwise_cohen_kappa"][0]["cohen_kappa"] == pytest.approx(0.0)

    # The export is what rlft's own data pipeline reads as DPO/reward-model pairs.
    sources = pytest.importorskip("rlft.data.sources")
    formats = pytest.importorskip("rlft.data.formats")
    records, _ = formats.convert(sources.read_rows(str(out)), kind="pairs")
    assert [r["chosen"] for r in records] == ["good0", "good1", "good2"]
    engine.dispose()


def test_cli_errors_exit_2_with_message(tmp_path, capsys):
    db = str(tmp_path / "labels.db")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    with pytest.raises(SystemExit) as info:
        main(["import", "--db", db, "--pairs", str(bad)])
    assert info.value.code == 2
    assert f"{bad}:1: response_a: missing" in capsys.readouterr().err
    main(["add-labeler", "--db", db, "ann"])
    with pytest.raises(SystemExit):
        main(["add-labeler", "--db", db, "ann"])
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["import", "--db", db])  # neither --pairs nor --generations
    for command in ("serve", "import", "export", "stats", "add-labeler"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "--db" in capsys.readouterr().out


def test_schema_version_is_recorded_and_newer_refused(tmp_path):
    db = str(tmp_path / "labels.db")
    engine = open_database(db)
    with engine.begin() as conn:
        assert conn.execute(text("select version from schema_info")).scalar_one() == SCHEMA_VERSION
        conn.execute(text("update schema_info set version = :v"), {"v": SCHEMA_VERSION + 1})
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="newer than this rlft supports"):
        open_database(db)


def test_label_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, rlft.cli.label, rlft.label.api, rlft.label.export; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_db_argument_forms():
    assert normalise_url("labels.db") == "sqlite:///labels.db"
    assert normalise_url("/abs/labels.db") == "sqlite:////abs/labels.db"
    assert normalise_url("postgresql://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgres://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    assert normalise_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
