"""lm-eval tasks run offline on an in-memory model, and agree with rlft's own log-likelihood scoring."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rlft.eval.accuracy import multiple_choice_accuracy
from rlft.eval.harness import TASKS_DIR, offline_tasks, run_lm_eval

pytest.importorskip("lm_eval")


def test_offline_tasks_are_shipped():
    assert {"rlft_mc_basics", "rlft_gen_arithmetic"} <= set(offline_tasks())


def test_multiple_choice_task_matches_rlft_scoring(tiny):
    model, tok = tiny
    result = run_lm_eval(model, tok, ["rlft_mc_basics"], batch_size=8)
    metrics = result["results"]["rlft_mc_basics"]
    rows = [json.loads(line) for line in (TASKS_DIR / "rlft_mc_basics.jsonl").read_text().splitlines()]
    ours = multiple_choice_accuracy(model, tok, rows)
    assert result["n_samples"]["rlft_mc_basics"] == len(rows) == 24
    assert metrics["acc"] == pytest.approx(ours["accuracy"])
    assert metrics["acc_norm"] == pytest.approx(ours["accuracy_norm"])


def test_generation_task_and_adapter_merge(tiny):
    peft = pytest.importorskip("peft")
    model, tok = tiny
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # make the adapter matter (B starts at zero)
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    plain = run_lm_eval(lora, tok, ["rlft_mc_basics", "rlft_gen_arithmetic"], limit=3, merge_adapter=False)
    merged = run_lm_eval(lora, tok, ["rlft_mc_basics"], limit=3, merge_adapter=True)
    assert plain["results"]["rlft_mc_basics"] == pytest.approx(merged["results"]["rlft_mc_basics"])
    assert "exact_match[last_number]" in plain["results"]["rlft_gen_arithmetic"]
    assert plain["n_samples"]["rlft_gen_arithmetic"] == 3
    # merging happened on a copy: the caller's model still carries its adapter
    assert any("lora_A" in name for name, _ in lora.named_parameters())


def test_unknown_task_names_are_reported(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="rlft_mc_basics"):
        run_lm_eval(model, tok, ["rlft_no_such_task"])
