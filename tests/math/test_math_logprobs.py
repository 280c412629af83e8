"""Chunked log-prob / entropy kernels: values and gradients against the naive full log-softmax, hand-computed
numbers, and a measured peak-memory comparison in fresh subprocesses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlft.logprobs import (
    IGNORE_INDEX,
    _as_row_blocks,
    entropy_from_logits,
    gather_logps,
    hidden_logps,
    hidden_logps_and_entropy,
)


def naive_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(labels == IGNORE_INDEX, 0.0)


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_gather_logps_hand_computed():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]])
    labels = torch.tensor([[1, 2]])
    expected = [-math.log(4), 3 - math.log(math.e + math.e**2 + math.e**3 + 1)]
    assert gather_logps(logits, labels, chunk_size=1).tolist()[0] == pytest.approx(expected, abs=1e-6)


def test_gather_logps_ignore_index_gives_zero_and_no_gradient():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [3, IGNORE_INDEX, IGNORE_INDEX]])
    out = gather_logps(logits, labels, chunk_size=2)
    assert out[0, 0] == 0 and out[1, 1] == 0 and out[1, 2] == 0
    out.sum().backward()
    assert torch.all(logits.grad[0, 0] == 0) and torch.all(logits.grad[1, 1:] == 0)
    assert logits.grad[0, 1].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gather_logps_matches_naive_fp32_values_and_grads(chunk_size, temperature):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 11, 97)).requires_grad_(True)
    labels = torch.randint(0, 97, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    weights = torch.randn(3, 11)

    ours = gather_logps(logits, labels, chunk_size=chunk_size, temperature=temperature)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    ref = naive_logps(logits, labels, temperature)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), logits)

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-6, rtol=1e-5)


def test_gather_logps_bf16_upcasts_per_chunk():
    torch.manual_seed(1)
    logits = (4 * torch.randn(2, 9, 300)).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 300, (2, 9))
    ours = gather_logps(logits, labels, chunk_size=4)
    # Same bf16 inputs, exact fp32 softmax: our result must be fp32-accurate, not bf16-accurate.
    ref = naive_logps(logits.detach(), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    bf16_naive = torch.log_softmax(logits.detach(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
    assert (ours - ref).abs().max() < (bf16_naive - ref).abs().max()

    (grad_ours,) = torch.autograd.grad(ours.sum(), logits)
    leaf = logits.detach().float().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(naive_logps(leaf, labels).sum(), leaf)
    assert grad_ours.dtype == torch.bfloat16
    torch.testing.assert_close(grad_ours.float(), grad_ref, atol=1e-2, rtol=1e-2)


def test_causal_shift_slice_is_processed_without_copying_the_logits():
    torch.manual_seed(7)
    logits = torch.randn(3, 9, 40, requires_grad=True)
    labels = torch.randint(0, 40, (3, 8))
    shifted = logits[:, :-1]
    with pytest.raises(RuntimeError):
        shifted.view(-1, 40)  # flattening would have to copy
    blocks = _as_row_blocks(shifted)
    assert blocks.data_ptr() == logits.data_ptr() and blocks.shape == (3, 8, 40)
    ours = gather_logps(shifted, labels, chunk_size=3)
    ref = naive_logps(shifted, labels)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(entropy_from_logits(logits[:, 1:], chunk_size=4), naive_entropy(logits[:, 1:]))
    hidden = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    head = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    hidden_labels = torch.tensor([[1, 6, IGNORE_INDEX, 0], [2, 2, 5, 3]])
    assert _as_row_blocks(hidden[:, :-1]).data_ptr() == hidden.data_ptr()
    assert torch.autograd.gradcheck(
        lambda h, w: hidden_logps(h[:, :-1], w, hidden_labels, chunk_size=3), (hidden, head)
    )


def test_gather_logps_gradcheck_fp64():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 5, IGNORE_INDEX], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda x: gather_logps(x, labels, chunk_size=4, temperature=0.5), (logits,))


def test_gather_logps_rejects_bad_input():
    with pytest.raises(ValueError, match="do not line up"):
        gather_logps(torch.randn(2, 4, 5), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 5\)"):
        gather_logps(torch.randn(2, 4, 5), torch.full((2, 4), 5))
    with pytest.raises(ValueError, match="chunk_size"):
        gather_logps(torch.randn(2, 4, 5), torch.zeros(2, 4, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 6, 1000])
def test_hidden_logps_matches_naive_values_and_grads(use_bias, chunk_size):
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16)).requires_grad_(True)
    bias = torch.randn(50, requires_grad=True) if use_bias else None
    labels = torch.randint(0, 50, (2, 7))
    labels[1, 5:] = IGNORE_INDEX
    weights = torch.randn(2, 7)
    inputs = [hidden, weight] + ([bias] if use_bias else [])

    ours = hidden_logps(hidden, weight, labels, chunk_size=chunk_size, bias=bias)
    grads_ours = torch.autograd.grad((ours * weights).sum(), inputs)
    ref = naive_logps(torch.nn.functional.linear(hidden, weight, bias), labels)
    grads_ref = torch.autograd.grad((ref * weights).sum(), inputs)

    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for g_ours, g_ref in zip(grads_ours, grads_ref):
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)


def test_hidden_logps_frozen_head_and_gradcheck():
    torch.manual_seed(4)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, IGNORE_INDEX, 8], [0, 3, 3]])
    assert torch.autograd.gradcheck(
        lambda h, w, b: hidden_logps(h, w, labels, chunk_size=2, bias=b, temperature=1.5), (hidden, weight, bias)
    )
    # A frozen LM head (LoRA on the backbone) must still give gradients to the hidden states.
    frozen = weight.detach()
    (grad,) = torch.autograd.grad(hidden_logps(hidden, frozen, labels, chunk_size=2).sum(), hidden)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["autocast", "bf16"])
def test_hidden_logps_mixed_precision_matches_naive(mode):
    """bf16-mixed training (fp32 params under autocast) and pure-bf16 models: the chunked path computes the same
    bf16 logits as a plain ``lm_head`` call, and gradients agree to bf16 resolution (one ulp at |g| ~ 6 is 0.03)."""
    torch.manual_seed(6)
    hidden = torch.randn(3, 10, 32)
    weight = 0.2 * torch.randn(300, 32)
    if mode == "bf16":
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    labels = torch.randint(0, 300, (3, 10))
    labels[0, :3] = IGNORE_INDEX
    weights = torch.randn(3, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        ours = hidden_logps(hidden, weight, labels, chunk_size=4)
        ref = naive_logps(torch.nn.functional.linear(hidden, weight), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    grads_ours = torch.autograd.grad((ours * weights).sum(), [hidden, weight])
    grads_ref = torch.autograd.grad((ref * weights).sum(), [hidden, weight])
    for g_ours, g_ref, param in zip(grads_ours, grads_ref, (hidden, weight)):
        assert g_ours.dtype == param.dtype
        torch.testing.assert_close(g_ours.float(), g_ref.float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("autocast", [False, True])
def test_hidden_logps_and_entropy_from_the_same_chunks(autocast):
    """The RL update's log-probs and logged entropy in one pass over the vocabulary: the log-probs (and their
    gradients) are hidden_logps', the entropy equals the naive one of the same logits, and is not differentiated."""
    torch.manual_seed(7)
    hidden = torch.randn(2, 9, 24, requires_grad=True)
    weight = 0.3 * torch.randn(70, 24)  # a frozen head
    labels = torch.randint(0, 70, (2, 9))
    labels[0, 6:] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logps, entropy = hidden_logps_and_entropy(hidden, weight, labels, chunk_size=4, temperature=0.7)
        alone = hidden_logps(hidden, weight, labels, chunk_size=4, temperature=0.7)
        logits = torch.nn.functional.linear(hidden, weight)
    assert torch.equal(logps, alone)
    assert not entropy.requires_grad and entropy.shape == labels.shape and entropy.dtype == torch.float32
    torch.testing.assert_close(entropy, naive_entropy(logits.float().detach() / 0.7), atol=1e-5, rtol=0)
    (grad,) = torch.autograd.grad(logps.sum(), hidden)
    (grad_alone,) = torch.autograd.grad(alone.sum(), hidden)
    assert torch.equal(grad, grad_alone)


def test_entropy_hand_computed_and_matches_naive():
    uniform = torch.zeros(1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8), abs=1e-6)
    two = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(two).item() == pytest.approx(expected, abs=1e-6)

    torch.manual_seed(5)
    logits = (2 * torch.randn(3, 5, 40)).requires_grad_(True)
    ours = entropy_from_logits(logits, chunk_size=4)
    ref = naive_entropy(logits)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    weights = torch.randn(3, 5)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-5)
    hot = logits.detach().requires_grad_(True)
    tempered = entropy_from_logits(hot, chunk_size=4, temperature=0.6)
    torch.testing.assert_close(tempered, naive_entropy(hot.detach() / 0.6), atol=1e-5, rtol=0)
    assert torch.autograd.gradcheck(
        lambda x: entropy_from_logits(x, chunk_size=2, temperature=0.6),
        (logits.detach()[0, :3].double().requires_grad_(),),
    )
    bf16 = logits.detach().to(torch.bfloat16)
    torch.testing.assert_close(entropy_from_logits(bf16, chunk_size=3), naive_entropy(bf16), atol=1e-5, rtol=0)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, json
    import torch
    from rlft.logprobs import gather_logps, hidden_logps

    def status_kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field))

    def reset_peak():  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")

    torch.manual_seed(0)
    rows, vocab, dim = 512, 32000, 64
    labels = torch.randint(0, vocab, (rows,))
    # A causal LM's [B, T, V] logits used as logits[:, :-1]: the slice must not be copied either.
    full_logits = torch.randn(4, rows // 4 + 1, vocab).to(torch.bfloat16).requires_grad_(True)
    logits, shifted_labels = full_logits[:, :-1], labels.view(4, rows // 4)
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    modes = {
        "chunked": lambda: gather_logps(logits, shifted_labels, chunk_size=32),
        "hidden_chunked": lambda: hidden_logps(hidden, weight, labels, chunk_size=32),
        "naive": lambda: torch.log_softmax(logits.float(), -1).gather(-1, shifted_labels[..., None])[..., 0],
        "hidden_naive": lambda: torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[:, None])[:, 0],
    }
    # Warm up on tiny inputs so one-time allocations (thread pools, kernel caches) are not charged to a mode.
    small = torch.randn(2, 5, 50, requires_grad=True)
    gather_logps(small[:, :-1], torch.zeros(2, 4, dtype=torch.long)).sum().backward()
    hidden_logps(hidden[:4], weight, labels[:4]).sum().backward()
    torch.log_softmax(small.float(), -1).sum().backward()
    result = {}
    # Chunked modes run first: memory the allocator keeps from an earlier mode could only hide growth of a
    # later one, which makes the comparison conservative.
    for name, forward in modes.items():
        for tensor in (full_logits, hidden, weight):
            tensor.grad = None
        gc.collect()
        reset_peak()
        base = status_kib("VmRSS")
        loss = forward().sum()
        # held between forward and backward: what autograd keeps alive while the rest of a model would run
        held = status_kib("VmRSS") - base
        loss.backward()
        result[name] = {"held_mib": held / 1024, "peak_mib": (status_kib("VmHWM") - base) / 1024}
    print(json.dumps(result))
    """
)


def test_chunked_paths_use_measurably_less_peak_memory():
    """Peak RSS growth over forward+backward, measured with Linux's resettable VmHWM in a fresh process.

    Logits are bf16 ``[4, 129, 32000]`` (31 MiB) used shifted, as ``logits[:, :-1]``. Both paths must hold two
    bf16 gradients (the slice's and the full tensor's, 63 MiB); beyond that the naive path materialises an fp32
    copy, an fp32 log-softmax and fp32 gradients (~125 MiB), the chunked path a few 32-row fp32 chunks (4 MiB
    each) and no copy of the slice. Between forward and backward the naive paths hold fp32 ``[N, V]`` tensors for
    autograd, the chunked ones only per-row statistics. From hidden states the naive path builds fp32 logits,
    log-softmax and their gradients; the chunked one never builds the logits (only the head's gradient, 8 MiB).
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("peak-RSS reset via /proc/self/clear_refs is Linux-only")
    # Large allocations straight from mmap, so RSS follows live tensors rather than glibc's retained heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    mib = json.loads(done.stdout.strip().splitlines()[-1])
    held = {mode: values["held_mib"] for mode, values in mib.items()}
    peak = {mode: values["peak_mib"] for mode, values in mib.items()}
    # Between forward and backward the naive paths keep fp32 [N, V] tensors alive (>= 60 MiB); ours keep O(N).
    assert held["naive"] > 60 and held["hidden_naive"] > 60, f"naive paths should hold fp32 logits: {held}"
    assert held["chunked"] < 0.1 * held["naive"], f"gather_logps holds too much between forward and backward: {held}"
    assert held["hidden_chunked"] < 0.15 * held["hidden_naive"], f"hidden_logps holds too much: {held}"
    gradients = 2 * 4 * 129 * 32000 * 2 / 2**20
    naive_excess, chunked_excess = peak["naive"] - gradients, peak["chunked"] - gradients
    assert naive_excess > 100, f"naive path should peak > 100 MiB beyond the gradients, measured {peak}"
    assert chunked_excess < 0.25 * naive_excess, f"chunked gather_logps peaks too high: {peak}"
    assert peak["hidden_chunked"] < 0.3 * peak["hidden_naive"], f"hidden_logps peaks too high: {peak}"


def test_default_chunk_holds_a_bounded_number_of_logit_bytes_whatever_the_vocabulary():
    from rlft.logprobs import CHUNK_BYTES, MAX_CHUNK_ROWS, MIN_CHUNK_ROWS, _chunk_rows

    # SmolLM2's 49k: 170 rows, 32 MiB of fp32 logits (a 1,024-row chunk was 192 MiB); 128k and Gemma's 262k: the
    # 128-row floor (128 MiB for 262k, where a fixed 1,024 rows were 1 GiB); small vocabularies: the row cap
    assert _chunk_rows(None, 49152) == 170 and 170 * 49152 * 4 <= CHUNK_BYTES < 171 * 49152 * 4
    assert _chunk_rows(None, 128256) == _chunk_rows(None, 262144) == _chunk_rows(None, 10**8) == MIN_CHUNK_ROWS == 128
    assert _chunk_rows(None, 512) == MAX_CHUNK_ROWS == 1024 and _chunk_rows(7, 262144) == 7
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        _chunk_rows(0, 100)
    hidden, weight = torch.randn(2, 300, 8), torch.randn(262144, 8) / 8
    labels = torch.randint(0, 262144, (2, 300))
    expected = torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(hidden_logps(hidden, weight, labels), expected, rtol=1e-5, atol=1e-5)
