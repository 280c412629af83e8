"""Model loading on tiny random-init configs of every supported architecture."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from rlft.models import CHATML_FALLBACK, LoraSettings, find_linear_targets, load_model, load_tokenizer, pull
from rlft.models.tiny import TINY_ARCHITECTURES

EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "mistral": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen3": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gemma": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],  # Conv1D layers, not nn.Linear
    "opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
}


@pytest.mark.parametrize("family", sorted(TINY_ARCHITECTURES))
def test_lora_train_step_save_and_reload_with_plain_peft(family, tmp_path):
    name = f"tiny-{family}"
    tokenizer = load_tokenizer(name)
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    base = load_model(name)
    assert find_linear_targets(base) == EXPECTED_TARGETS[family]

    model = load_model(name, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".")[-4] for n in trainable}  # ...<target>.lora_A.default.weight
    assert adapted == set(EXPECTED_TARGETS[family])

    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)

    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    plain_base = transformers.AutoModelForCausalLM.from_pretrained(str(pull(name)))
    reloaded = peft.PeftModel.from_pretrained(plain_base, tmp_path / "adapter").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_adapter_folder_is_a_model_string(tmp_path):
    model = load_model("tiny-qwen2", lora=LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter matter
    model.save_pretrained(tmp_path)
    load_tokenizer("tiny-qwen2").save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert isinstance(again, peft.PeftModel)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert load_tokenizer(str(tmp_path)).chat_template


def test_gradient_checkpointing_with_lora_backpropagates():
    model = load_model("tiny-llama", lora=LoraSettings(r=4, dropout=0.0), gradient_checkpointing=True)
    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # lora_A gets 0: B starts at 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_quantization_without_cuda_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for CPU-only machines")
    with pytest.raises(RuntimeError, match="(CUDA GPU|bitsandbytes)"):
        load_model("tiny-llama", lora=LoraSettings(), quantization="4bit")


def test_bad_model_strings_give_actionable_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(ConnectionError, match="offline aliases"):
        load_tokenizer("some-org/definitely-not-on-this-machine")


def test_tokenizer_without_template_or_pad_gets_chatml_and_a_pad(tmp_path):
    tokenizer = load_tokenizer("tiny-gpt2")
    tokenizer.chat_template = None
    tokenizer.pad_token = None
    model = load_model("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == CHATML_FALLBACK
    assert loaded.pad_token is not None and loaded.pad_token != loaded.eos_token


def test_methods_train_in_train_mode_so_checkpointing_is_active():
    from rlft.methods import SFT

    module = SFT(model="tiny-llama", gradient_checkpointing=True)
    layers = [m for m in module.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers and all(m.training for m in module.model.modules())


def test_is_adapter_is_known_before_loading_and_picks_dpos_reference(tmp_path):
    from rlft.methods import DPO
    from rlft.models import is_adapter

    model = load_model("tiny-llama", lora=LoraSettings(r=4, dropout=0.0))
    model.save_pretrained(tmp_path / "adapter")
    load_tokenizer("tiny-llama").save_pretrained(tmp_path / "adapter")
    assert is_adapter(str(tmp_path / "adapter"))
    assert not is_adapter("tiny-llama") and not is_adapter(str(tmp_path))
    # continuing an adapter folder without new LoRA settings: the frozen copy of that adapter is the reference
    dpo = DPO(str(tmp_path / "adapter"), lora=None)
    assert dpo.reference_mode == "adapter"
    assert "ref" in dpo.model.peft_config  # built on first access, with the `ref` adapter loaded
    with pytest.raises(ValueError, match="reference: adapter needs a LoRA policy"):
        DPO("tiny-llama", lora=None, reference="adapter")
