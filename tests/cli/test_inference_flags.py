"""``--device``, ``--dtype`` and ``--quantization`` on ``rlft generate``, ``rlft eval *`` and ``rlft serve``: one
loader behind all of them, with defaults that follow the hardware and clear errors for what cannot run here."""

from __future__ import annotations

import json

import pytest
import torch

from rlft.cli import main as rlft_main
from rlft.cli.inference import load_for_inference, resolve_inference

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


def test_defaults_follow_the_hardware():
    device, dtype = resolve_inference(None, None, None)
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dtype == ("float32" if device == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert resolve_inference("cpu", "bfloat16", None) == ("cpu", "bfloat16")


@needs_no_cuda
def test_cuda_only_requests_fail_clearly_on_a_cpu_machine():
    with pytest.raises(ValueError, match="needs a CUDA GPU .*drop --quantization"):
        resolve_inference(None, None, "4bit")
    with pytest.raises(ValueError, match="no CUDA GPU; use --device cpu"):
        resolve_inference("cuda", None, None)
    with pytest.raises(ValueError, match="--dtype must be one of"):
        resolve_inference("cpu", "float8", None)
    with pytest.raises(ValueError, match="--device must be cpu, cuda or cuda:N"):
        resolve_inference("tpu", None, None)


@needs_no_cuda
@pytest.mark.parametrize(
    "command",
    [
        ["generate", "tiny-llama", "--prompt", "hi"],
        ["eval", "perplexity", "tiny-llama", "rlft/assets/sample_sft.jsonl"],
        ["serve", "tiny-llama"],
    ],
)
def test_every_command_refuses_quantization_without_cuda(command, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    monkeypatch.setenv("RLFT_DEBUG", "1")  # the exception itself, not the router's one-line report of it
    with pytest.raises(ValueError, match="--quantization 8bit needs a CUDA GPU"):
        rlft_main([*command, "--quantization", "8bit"])


def test_dtype_and_device_reach_the_model():
    model, tokenizer = load_for_inference("tiny-qwen2", device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template


def test_generate_and_eval_take_the_flags(repo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    rlft_main(
        [
            "generate",
            "tiny-llama",
            "--prompt",
            "hello",
            "--max_new_tokens",
            "4",
            "--no_stream",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
        ]
    )
    assert ">>> hello" in capsys.readouterr().out
    out = tmp_path / "ppl"
    rlft_main(
        [
            "eval",
            "perplexity",
            "tiny-llama",
            "rlft/assets/sample_sft.jsonl",
            "--limit",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--out",
            str(out),
        ]
    )
    fp32 = json.loads((out / "perplexity.json").read_text())["metrics"]["perplexity"]
    rlft_main(
        [
            "eval",
            "perplexity",
            "tiny-llama",
            "rlft/assets/sample_sft.jsonl",
            "--limit",
            "4",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--out",
            str(tmp_path / "bf16"),
        ]
    )
    bf16 = json.loads((tmp_path / "bf16" / "perplexity.json").read_text())["metrics"]["perplexity"]
    assert fp32 != bf16 and abs(fp32 - bf16) / fp32 < 0.05  # the dtype was used, and bf16 is close
