"""``decoder.backend: vllm`` against a stand-in engine (no GPU here): the weight hand-off and the sample layout.

vLLM itself cannot run on these machines (no CUDA GPU), so a stand-in ``vllm`` package is installed for these tests:
its engine is a plain Hugging Face copy of the policy's base folder whose ``load_weights`` accepts exactly the names
of that model's parameters (as vLLM's ``load_weights`` takes checkpoint names) and whose ``generate`` samples with
rlft's decoder, reporting stop tokens the way vLLM does (in ``stop_reason``). What is checked is rlft's side of the
contract: which tensors are pushed under which names, that LoRA arrives merged and the policy is left untouched,
and that samples come back in the rollout's layout. On a GPU, ``scripts/gpu_check.sh`` runs the real engine.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, replace

import pytest
import torch
import transformers

from rlft.generation.decoder import decode, merged_adapter
from rlft.generation.settings import ONLINE_SAMPLING, DecoderSettings
from rlft.models import LoraSettings, load_model, load_tokenizer
from rlft.models.unwrap import causal_lm
from rlft.rl.rollout import collect_rollout
from tests.rl.test_rollout import prompt_batch


@dataclass
class _Sample:
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | None


class _Runner:
    def __init__(self, network) -> None:
        self.network, self.pushed = network, []

    def load_weights(self, weights) -> None:
        params = dict(self.network.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)  # an unknown name is a KeyError, as in vLLM
            self.pushed.append(name)


class _LLM:
    def __init__(self, model: str, **options) -> None:
        self.options = options
        self.network = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
        runner = _Runner(self.network)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=runner))
            )
        )
        self.prefix_resets = 0

    def reset_prefix_cache(self) -> None:
        self.prefix_resets += 1

    def generate(self, prompts, params, use_tqdm=False):
        results = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            rows = decode(
                self.network,
                ids,
                torch.ones_like(ids),
                max_new_tokens=params.max_tokens,
                stop_ids=params.stop_token_ids,
                pad_id=-1,
                group_size=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
            )
            samples = []
            for row in rows.tolist():
                row = [t for t in row if t != -1]
                if row and row[-1] in params.stop_token_ids:  # vLLM: the stop token id is the stop reason
                    samples.append(_Sample(row[:-1], "stop", row[-1]))
                else:
                    samples.append(_Sample(row, "length", None))
            results.append(types.SimpleNamespace(outputs=samples))
        return results


class _SamplingParams:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = _LLM, _SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr("rlft.generation.vllm.vllm_usable", lambda: True)
    return module


@pytest.fixture
def policy():
    torch.manual_seed(0)
    model = load_model("tiny-llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so merging changes the weights
            torch.nn.init.normal_(param, std=0.05)
    return model.eval(), load_tokenizer("tiny-llama")


def test_the_engine_receives_the_merged_policy_under_its_checkpoint_names(fake_vllm, policy):
    from rlft.generation.vllm import colocated_engine

    model, tokenizer = policy
    before = {n: p.clone() for n, p in model.named_parameters()}
    engine = colocated_engine(model, gpu_memory_utilization=0.25)
    assert colocated_engine(model) is engine  # built once per policy
    assert engine.llm.options["gpu_memory_utilization"] == 0.25
    sent = engine.push(model)
    network = engine.llm.network
    assert sorted(engine.llm.llm_engine.model_executor.driver_worker.model_runner.model.pushed) == sorted(
        n for n, _ in network.named_parameters()
    )
    assert sent == len(list(network.named_parameters())) and engine.llm.prefix_resets == 1
    with torch.no_grad(), merged_adapter(model):
        merged = {n.replace(".base_layer.", "."): p.clone() for n, p in causal_lm(model).named_parameters()}
    assert all(torch.equal(p, merged[n]) for n, p in network.named_parameters())
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(
        network.get_parameter(q_proj),
        before[f"base_model.model.{q_proj}".replace("q_proj.weight", "q_proj.base_layer.weight")],
    )  # the adapter is in it
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the policy is untouched


def test_vllm_rollouts_come_back_in_the_rollout_layout(fake_vllm, policy):
    model, tokenizer = policy
    batch = prompt_batch(tokenizer)
    greedy = dict(max_new_tokens=12, temperature=0.0)
    torch.manual_seed(0)
    ours = collect_rollout(model, tokenizer, batch, replace(ONLINE_SAMPLING, **greedy), group_size=3)
    torch.manual_seed(0)
    theirs = collect_rollout(
        model, tokenizer, batch, replace(ONLINE_SAMPLING, **greedy), DecoderSettings(backend="vllm"), group_size=3
    )
    width = ours.response_ids.shape[1]
    assert torch.equal(theirs.response_ids[:, :width], ours.response_ids)
    assert torch.equal(theirs.response_mask[:, :width], ours.response_mask)
    assert torch.equal(theirs.finished, ours.finished) and theirs.completions == ours.completions
    assert torch.allclose(theirs.logps[:, :width], ours.logps)  # the update's log-probs come from the policy


def test_without_vllm_or_a_gpu_the_error_names_the_fallback(policy):
    model, tokenizer = policy
    with pytest.raises(RuntimeError, match="decoder.backend rlft"):
        collect_rollout(
            model,
            tokenizer,
            prompt_batch(tokenizer),
            replace(ONLINE_SAMPLING, max_new_tokens=4),
            DecoderSettings(backend="vllm"),
        )
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        DecoderSettings(backend="vllm", vllm_gpu_memory_utilization=1.5)
