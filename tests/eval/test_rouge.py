"""ROUGE: mean F1 equal to rouge-score's own numbers, references from SFT records, and the callback in a fit."""

from __future__ import annotations

import lightning as L
import pytest
from rouge_score import rouge_scorer

from rlft.callbacks import RougeCallback
from rlft.data import PreferenceDataModule
from rlft.eval.rouge import prompts_and_references, rouge
from rlft.methods import SFT

SFT_DATA = "rlft/assets/sample_sft.jsonl"


def test_rouge_is_the_mean_f1_of_rouge_score():
    predictions = ["the cat sat on the mat", "a quick brown fox", "nothing in common"]
    references = ["the cat sat on a mat", "the quick brown fox jumps", "zebra"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    by_hand = [scorer.score(r, p) for p, r in zip(predictions, references)]
    got = rouge(predictions, references)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert got[name] == pytest.approx(sum(s[name].fmeasure for s in by_hand) / 3)
    assert rouge(["same words here"], ["same words here"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    # "the cat sat on the mat" vs "the cat sat on a mat": 5 of 6 unigrams match each way -> F1 5/6
    assert rouge(predictions[:1], references[:1])["rouge1"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="as many predictions as references"):
        rouge(["a"], [])


def test_references_are_the_last_assistant_turn():
    records = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ]
    prompts, references = prompts_and_references(records)
    assert references == ["4"] and [m["content"] for m in prompts[0]] == ["hi", "hello", "2+2?"]
    with pytest.raises(ValueError, match="record 0: no assistant reply"):
        prompts_and_references([{"messages": [{"role": "assistant", "content": "alone"}]}])
    with pytest.raises(ValueError, match=r"record 0: ROUGE needs chat data .* keys \['text'\]; score plain text"):
        prompts_and_references([{"text": "a plain text row (format text) has no reply to compare with"}])


def test_rouge_callback_logs_during_fit(tmp_path):
    L.seed_everything(0)
    callback = RougeCallback(SFT_DATA, limit=3, max_new_tokens=6, every_n_steps=2, at_fit_end=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = SFT(model="tiny-llama", output_dir=str(tmp_path / "hf"))
    trainer.fit(module, PreferenceDataModule(path=SFT_DATA, batch_size=2, val_fraction=0.0))
    ((step, metrics),) = callback.history
    assert step == 2 and set(metrics) == {"eval/rouge1", "eval/rouge2", "eval/rougeL"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())


def test_rlft_eval_rouge_scores_the_models_answers_against_the_references(tmp_path, capsys):
    import json

    from rlft.cli import main

    main(["eval", "rouge", "tiny-llama", SFT_DATA, "--limit", "4", "--max_new_tokens", "8", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "rouge.json").read_text())
    rows = result["details"]["rows"]
    references = [r["reference"] for r in rows]
    assert result["metrics"]["n"] == 4 and references == prompts_and_references(_first_records(4))[1]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):  # the reported number is rouge-score's on the written predictions
        expected = sum(scorer.score(r["reference"], r["prediction"])[name].fmeasure for r in rows) / len(rows)
        assert result["metrics"][name] == pytest.approx(expected)
    assert "rouge1" in capsys.readouterr().out


def _first_records(n: int) -> list[dict]:
    from rlft.eval.data import load_records

    return load_records(SFT_DATA, kind="sft", limit=n)
