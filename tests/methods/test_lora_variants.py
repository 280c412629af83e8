"""DoRA and rsLoRA from YAML: the adapter is built with them, a GRPO run samples and trains through a DoRA adapter
(unmerged: it cannot be folded into one matmul), and the exported folder records them for plain peft."""

from __future__ import annotations

import json

import pytest
import torch

from rlft.models import LoraSettings, load_model

pytestmark = pytest.mark.usefixtures("single_thread")


def test_dora_and_rslora_reach_peft():
    model = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, use_dora=True, use_rslora=True))
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    layer = next(m for m in model.modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector)
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector  # DoRA's magnitudes


def test_grpo_trains_a_dora_adapter_and_exports_it(cli_fit, tmp_path):
    rows = cli_fit("grpo", "--model.init_args.lora.use_dora", "true", steps=2, validate=False)
    assert len(rows.column("train/loss")) == 2 and all(torch.isfinite(torch.tensor(rows.column("train/loss"))))
    exported = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert exported["use_dora"] is True
    import peft
    from transformers import AutoModelForCausalLM

    from rlft.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama").path)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "hf"))
    magnitudes = [p for n, p in loaded.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes, "plain peft loads the DoRA magnitudes"
