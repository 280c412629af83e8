"""Chunked, memory-lean per-token log-probabilities and entropies.

A causal LM's logits are ``[B, T, V]`` with ``V`` in the tens of thousands, so a full fp32 ``log_softmax`` is often
the largest tensor in a training step (e.g. 8 x 2048 x 128k x 4 bytes = 8 GiB). The functions here never build it:

* :func:`gather_logps` walks the logits in chunks of rows and computes ``logit[label] - logsumexp(row)``, upcasting
  only the current chunk. A custom autograd function saves the (possibly bf16) logits plus one fp32 ``logsumexp``
  per row and recomputes the softmax chunk by chunk in backward, so autograd does not keep fp32 copies either.
* :func:`hidden_logps` goes one step further and starts from the final hidden states: it multiplies one chunk of
  tokens by the LM head at a time, so the ``[B, T, V]`` logits never exist at once, in forward or backward.
* :func:`entropy_from_logits` computes the per-position Shannon entropy with the same chunking.

All three are public through :mod:`rlft.ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
"""Label value that marks a position as "not scored" (prompt, padding); its log-prob is reported as 0."""

CHUNK_BYTES = 32 * 2**20
"""Default chunk: as many rows as fit in this many bytes of fp32 logits (a CPU's last-level cache; at least
``MIN_CHUNK_ROWS``, at most ``MAX_CHUNK_ROWS``): 170 rows of a 49k vocabulary, 128 of a 128k or Gemma's 262k. The
forward holds about three chunk-sized buffers at once (logits, their fp32 copy, the exp inside logsumexp), and a
chunk that stays in cache is also faster: forward + backward through SmolLM2's head for 700 tokens took 0.30 s at
170 rows against 0.41 s at 341 and 0.54 s at 1,024 (bf16, 2-core CPU with a 32 MiB L3)."""
MIN_CHUNK_ROWS = 128
"""Fewer rows per chunk stream the whole head once more per chunk for too little work: 32 rows of a 262k vocabulary
took 2.9 s where 128 rows took 2.4 s (700 tokens)."""
MAX_CHUNK_ROWS = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision softmax statistics lose too much; fp64 inputs keep their precision (used by parity tests).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    """``chunk_size`` checked, or the default for this vocabulary (see ``CHUNK_BYTES``)."""
    if chunk_size is None:
        return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab)))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    return chunk_size


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    # skipping the no-op division saves one chunk-sized temporary
    return chunk if temperature == 1.0 else chunk / temperature


def _as_row_blocks(logits: torch.Tensor) -> torch.Tensor:
    """View ``[..., V]`` (logits, or hidden states ``[..., H]``) as ``[A, M, V]`` row blocks, without copying.

    ``logits[:, :-1]`` (the causal shift) cannot be flattened to ``[N, V]`` as a view (``reshape`` would silently
    copy the whole tensor), but it is ``B`` blocks of ``T - 1`` contiguous rows, which is all the kernels need.
    """
    vocab = logits.shape[-1]
    layouts = [(1, -1, vocab)] + ([(-1, logits.shape[-2], vocab)] if logits.dim() >= 2 else [])
    for layout in layouts:
        try:
            return logits.view(*layout)
        except RuntimeError:
            continue
    return logits.reshape(1, -1, vocab)  # exotic strides: a copy is unavoidable


def _row_chunks(blocks: torch.Tensor, chunk_size: int):
    """``(block, row slice)`` pairs covering ``[A, M, ...]`` with at most ``chunk_size`` rows each."""
    for block in range(blocks.shape[0]):
        for start in range(0, blocks.shape[1], chunk_size):
            yield block, slice(start, start + chunk_size)


class _GatherLogps(torch.autograd.Function):
    """``log_softmax(logits / temperature)[label]`` over ``[A, M, V]`` row blocks, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_size: int, temperature: float):
        out_dtype = _compute_dtype(logits.dtype)
        valid = labels != IGNORE_INDEX
        safe_labels = labels.masked_fill(~valid, 0)
        out = torch.empty(labels.shape, dtype=out_dtype, device=logits.device)
        lse = torch.empty(labels.shape, dtype=out_dtype, device=logits.device)
        for block, rows in _row_chunks(logits, chunk_size):
            chunk = _scaled(logits[block, rows].to(out_dtype), temperature)
            lse[block, rows] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, safe_labels[block, rows].unsqueeze(-1)).squeeze(-1)
            out[block, rows] = picked - lse[block, rows]
        out = out.masked_fill(~valid, 0.0)
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, safe_labels, valid, lse = ctx.saved_tensors
        grad_rows = (grad_out * valid).to(lse.dtype) / ctx.temperature
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for block, rows in _row_chunks(logits, ctx.chunk_size):
            # d/dx [x_y - logsumexp(x)] = onehot(y) - softmax(x); one fresh buffer per chunk, updated in place,
            # keeps temporaries and memory passes to a minimum.
            grad = logits[block, rows].to(lse.dtype, copy=True)
            if ctx.temperature != 1.0:
                grad.div_(ctx.temperature)
            scale = grad_rows[block, rows].unsqueeze(-1)
            grad.sub_(lse[block, rows].unsqueeze(-1)).exp_().mul_(-scale)
            grad.scatter_add_(-1, safe_labels[block, rows].unsqueeze(-1), scale)
            grad_logits[block, rows].copy_(grad)
        return grad_logits, None, None, None


def gather_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probability of each label under ``logits``, without a full fp32 log-softmax.

    Equivalent to ``torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]`` with
    ignored positions set to 0, but the peak extra memory is one fp32 chunk of ``chunk_size`` rows (forward and
    backward). Labels must already be aligned with the logits (shift them yourself for causal LMs).

    Args:
        logits: ``[..., V]`` logits in any float dtype (bf16/fp16 are upcast one chunk at a time).
        labels: ``[...]`` integer token ids; positions equal to ``IGNORE_INDEX`` (-100) give 0.
        chunk_size: rows (positions) processed at once; default: those whose fp32 logits fit ``CHUNK_BYTES``.
        temperature: divide logits by this before the softmax (sampling temperature of the rollout).

    Returns:
        ``[...]`` log-probs in fp32 (fp64 when the logits are fp64), differentiable w.r.t. ``logits``.

    Raises:
        ValueError: if the shapes do not line up or a label is out of the vocabulary.
    """
    chunk_size = _chunk_rows(chunk_size, logits.shape[-1])
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not line up: expected logits shaped "
            "labels.shape + (vocab,). For a causal LM pass logits[:, :-1] and labels[:, 1:]."
        )
    vocab = logits.shape[-1]
    flat_labels = labels.reshape(-1).long()
    scored = flat_labels[flat_labels != IGNORE_INDEX]
    if scored.numel() and (scored.min() < 0 or scored.max() >= vocab):
        raise ValueError(
            f"labels must be in [0, {vocab}) or {IGNORE_INDEX}; got values in "
            f"[{int(scored.min())}, {int(scored.max())}]"
        )
    blocks = _as_row_blocks(logits)
    out = _GatherLogps.apply(blocks, flat_labels.view(blocks.shape[:-1]), chunk_size, temperature)
    return out.reshape(labels.shape)


class _HiddenLogps(torch.autograd.Function):
    """Per-token log-probs from ``[A, M, H]`` hidden-state blocks through an LM head ``[V, H]``, chunk by chunk.

    The projection runs in ``matmul_dtype`` (the autocast dtype when autocast was on at forward time, else the
    inputs' dtype), fixed at forward time so the backward recomputation sees exactly the forward's logits whatever
    the autocast state of the backward pass.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        chunk_size: int,
        temperature: float,
        matmul_dtype: torch.dtype,
        with_entropy: bool = False,
    ):
        out_dtype = _compute_dtype(matmul_dtype)
        valid = labels != IGNORE_INDEX
        safe_labels = labels.masked_fill(~valid, 0)
        out = torch.empty(labels.shape, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(labels.shape, dtype=out_dtype, device=hidden.device)
        # the entropy of each position's distribution (a statistic: not differentiated) from the same chunk
        entropy = torch.empty(labels.shape if with_entropy else (0,), dtype=out_dtype, device=hidden.device)
        # Cast the head once, not once per chunk.
        head, head_bias = _cast(weight, matmul_dtype), _cast(bias, matmul_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for block, rows in _row_chunks(hidden, chunk_size):
                logits = F.linear(hidden[block, rows].to(matmul_dtype), head, head_bias)
                chunk = _scaled(logits.to(out_dtype), temperature)
                lse[block, rows] = torch.logsumexp(chunk, dim=-1)
                picked = chunk.gather(-1, safe_labels[block, rows].unsqueeze(-1)).squeeze(-1)
                out[block, rows] = picked - lse[block, rows]
                if with_entropy:
                    entropy[block, rows] = _chunk_entropy(chunk, lse[block, rows])
        ctx.save_for_backward(hidden, weight, bias, safe_labels, valid, lse)
        ctx.chunk_size, ctx.temperature, ctx.matmul_dtype = chunk_size, temperature, matmul_dtype
        ctx.mark_non_differentiable(entropy)
        return out.masked_fill(~valid, 0.0), entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor, _grad_entropy: torch.Tensor):
        hidden, weight, bias, safe_labels, valid, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        mm = ctx.matmul_dtype
        grad_rows = (grad_out * valid).to(lse.dtype) / ctx.temperature
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        # The head's gradient is a sum over all chunks: accumulate it in fp32 (fp64 for fp64), cast once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=lse.dtype, device=bias.device) if need_bias else None
        head, head_bias = _cast(weight, mm), _cast(bias, mm)
        with torch.autocast(hidden.device.type, enabled=False):
            for block, rows in _row_chunks(hidden, ctx.chunk_size):
                chunk_hidden = hidden[block, rows].to(mm)
                grad_logits = F.linear(chunk_hidden, head, head_bias).to(lse.dtype)  # fresh buffer: in-place is safe
                if ctx.temperature != 1.0:
                    grad_logits.div_(ctx.temperature)
                # d/dlogits [logit_y - logsumexp] = onehot(y) - softmax
                scale = grad_rows[block, rows].unsqueeze(-1)
                grad_logits.sub_(lse[block, rows].unsqueeze(-1)).exp_().mul_(-scale)
                grad_logits.scatter_add_(-1, safe_labels[block, rows].unsqueeze(-1), scale)
                if need_bias:
                    grad_bias += grad_logits.sum(0)
                grad_logits = grad_logits.to(mm)
                if need_hidden:
                    grad_hidden[block, rows] = (grad_logits @ head).to(hidden.dtype)
                if need_weight:
                    grad_weight += (grad_logits.transpose(0, 1) @ chunk_hidden).to(lse.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _chunk_entropy(chunk: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # -sum p log p rather than logsumexp(x) - sum p x: the latter cancels badly for peaked rows in fp32
    logp = chunk - lse.unsqueeze(-1)
    return -(torch.exp(logp) * logp).sum(-1)


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` would compute in here, autocast included (fp64 is never autocast)."""
    device_type = hidden.device.type
    promoted = torch.promote_types(hidden.dtype, weight.dtype)
    if promoted != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return promoted


def hidden_logps(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs straight from the final hidden states, never building the ``[B, T, V]`` logits.

    Equivalent to ``gather_logps(F.linear(hidden_states, lm_head_weight, bias), labels)``. Forward and backward
    both process ``chunk_size`` tokens at a time and recompute that chunk's logits, so the extra memory is a few
    ``[chunk_size, V]`` fp32 blocks; gradients flow to ``hidden_states``, ``lm_head_weight`` and ``bias``. The
    projection runs in the dtype a plain ``lm_head`` call would use (the autocast dtype under autocast, e.g.
    Lightning's ``bf16-mixed``), the softmax statistics in fp32.

    Args:
        hidden_states: ``[..., H]`` final hidden states (after the model's last norm), aligned with ``labels``.
        lm_head_weight: ``[V, H]`` output embedding (``model.get_output_embeddings().weight``).
        labels: ``[...]`` token ids, ``IGNORE_INDEX`` (-100) for positions that give 0.
        chunk_size: tokens processed at once; default: those whose fp32 logits fit ``CHUNK_BYTES``.
        bias: optional ``[V]`` LM-head bias.
        temperature: divide logits by this before the softmax.

    Returns:
        ``[...]`` fp32 log-probs (fp64 for fp64 inputs).

    Raises:
        ValueError: on mismatched shapes or out-of-vocabulary labels.
    """
    return _hidden_logps(hidden_states, lm_head_weight, labels, chunk_size, bias, temperature, False)[0]


def hidden_logps_and_entropy(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hidden_logps` and, from the same chunks, each position's entropy (nats, detached) of
    ``softmax(logits / temperature)`` — what an RL update logs, without a second pass over the vocabulary."""
    return _hidden_logps(hidden_states, lm_head_weight, labels, chunk_size, bias, temperature, True)


def _hidden_logps(hidden_states, lm_head_weight, labels, chunk_size, bias, temperature, with_entropy):
    chunk_size = _chunk_rows(chunk_size, lm_head_weight.shape[0])
    _check_temperature(temperature)
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} do not line up: expected "
            "hidden_states shaped labels.shape + (hidden,)."
        )
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(
            f"lm_head_weight must be [vocab, hidden={hidden_states.shape[-1]}], got {tuple(lm_head_weight.shape)}"
        )
    vocab = lm_head_weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [{vocab}], got {tuple(bias.shape)}")
    flat_labels = labels.reshape(-1).long()
    scored = flat_labels[flat_labels != IGNORE_INDEX]
    if scored.numel() and (scored.min() < 0 or scored.max() >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) or {IGNORE_INDEX}")
    blocks = _as_row_blocks(hidden_states)  # hidden[:, :-1] is used in place, not copied
    matmul_dtype = _matmul_dtype(blocks, lm_head_weight)
    block_labels = flat_labels.view(blocks.shape[:-1])
    out, entropy = _HiddenLogps.apply(
        blocks, lm_head_weight, bias, block_labels, chunk_size, temperature, matmul_dtype, with_entropy
    )
    return out.reshape(labels.shape), entropy.reshape(labels.shape) if with_entropy else None


class _Entropy(torch.autograd.Function):
    """Shannon entropy of ``softmax(row / temperature)`` for each row of ``[A, M, V]`` row blocks, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, chunk_size: int, temperature: float):
        out_dtype = _compute_dtype(logits.dtype)
        entropy = torch.empty(logits.shape[:-1], dtype=out_dtype, device=logits.device)
        lse = torch.empty_like(entropy)
        for block, rows in _row_chunks(logits, chunk_size):
            chunk = _scaled(logits[block, rows].to(out_dtype), temperature)
            lse[block, rows] = torch.logsumexp(chunk, dim=-1)
            entropy[block, rows] = _chunk_entropy(chunk, lse[block, rows])
        ctx.save_for_backward(logits, lse, entropy)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, lse, entropy = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for block, rows in _row_chunks(logits, ctx.chunk_size):
            logp = _scaled(logits[block, rows].to(lse.dtype), ctx.temperature) - lse[block, rows].unsqueeze(-1)
            # dH/dx_j = -p_j (log p_j + H) / temperature
            scale = grad_out[block, rows].unsqueeze(-1).to(lse.dtype) / ctx.temperature
            grad = -torch.exp(logp) * (logp + entropy[block, rows].unsqueeze(-1)) * scale
            grad_logits[block, rows].copy_(grad)
        return grad_logits, None, None


def entropy_from_logits(
    logits: torch.Tensor, chunk_size: int | None = None, *, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position entropy (nats) of ``softmax(logits / temperature)``, chunked so no full fp32 copy is made.

    Args:
        logits: ``[..., V]`` logits in any float dtype.
        chunk_size: rows processed at once; default: those whose fp32 logits fit ``CHUNK_BYTES``.
        temperature: sampling temperature (divides the logits chunk by chunk, without a full-size copy).

    Returns:
        ``[...]`` entropies in fp32 (fp64 for fp64 logits), differentiable w.r.t. ``logits``.
    """
    chunk_size = _chunk_rows(chunk_size, logits.shape[-1])
    _check_temperature(temperature)
    return _Entropy.apply(_as_row_blocks(logits), chunk_size, temperature).reshape(logits.shape[:-1])
