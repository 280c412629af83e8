"""Real model: SmolLM2-135M-Instruct learns the calculator's call format from TRL tool conversations (LoRA SFT, a few
CPU steps), then solves held-out multi-turn calculator tasks through the agent rollout (`rlft.eval.agent`): it calls
the tool, reads the result from the `tool` turn and answers with it. Untrained, it never calls the tool."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from rlft.data import PreferenceDataModule
from rlft.eval.agent import evaluate_agent
from rlft.generation.settings import SamplingSettings
from rlft.methods import SFT, OptimizerSettings
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.rl.multiturn import AgentSettings
from rlft.rl.rewards import Rewards

pytestmark = pytest.mark.real
ASSETS = Path(__file__).resolve().parents[2] / "rlft" / "assets"


def _success(model, tokenizer, records) -> dict:
    report = evaluate_agent(
        model,
        tokenizer,
        records,
        AgentSettings(tools=["calculator"], max_turns=3, max_tokens=192),
        Rewards([{"source": "exact_match", "options": {"field": "answer", "extract": "last_number"}}]),
        SamplingSettings(max_new_tokens=56),
    )
    return report.metrics()


def test_smollm2_learns_to_call_the_calculator_and_answers_held_out_tasks(smollm2, tmp_path):
    records = [json.loads(line) for line in (ASSETS / "tool_arithmetic_heldout.jsonl").open()][:8]
    tokenizer = load_tokenizer(smollm2)
    before = _success(load_model(smollm2), tokenizer, records)
    L.seed_everything(0)
    module = SFT(
        model=smollm2,
        lora=LoraSettings(r=16, alpha=32, dropout=0.0),
        optim=OptimizerSettings(lr=5e-4, warmup_steps=1, scheduler="constant_with_warmup"),
        output_dir=str(tmp_path / "hf"),
    )
    data = PreferenceDataModule(
        path=str(ASSETS / "tool_arithmetic_sft.jsonl"), batch_size=4, max_length=512, val_fraction=0.0, seed=0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    after = _success(load_model(str(tmp_path / "hf")), load_tokenizer(str(tmp_path / "hf")), records)
    print(f"SmolLM2 calculator agent on 8 held-out tasks: before {before} -> after SFT {after}")
    assert before["tool_calls_per_episode"] == 0.0  # the instruct model does not use the tool on its own
    assert after["tool_calls_per_episode"] >= 0.9 and after["invalid_call_rate"] <= 0.2
    assert after["success_rate"] >= 0.5 > before["success_rate"]
