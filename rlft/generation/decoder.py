"""rlft's own decoder (``backend: rlft``): each prompt prefilled once for its whole group, finished rows dropped,
LoRA merged.

``model.generate`` spends a rollout's time on work a GRPO group does not need: it prefills every prompt
``group_size`` times, keeps decoding rows that already stopped (their tokens are thrown away), and runs peft's two
extra matmuls plus its Python dispatch in every adapted linear layer for every token. :func:`decode` instead

- prefills the unique prompts, then repeats their KV cache ``group_size`` times (the samples of one prompt share
  its prefix exactly, so this is the same computation done once);
- removes a row from the batch and from the cache as soon as it samples a stop token;
- runs the adapter merged into the base weights (:func:`merged_adapter`: a temporary ``W + s·BA`` per adapted
  layer, the original tensors put back afterwards, so training sees bit-identical weights).

Sampling follows ``generate``'s order (temperature, then top-k, then top-p) and draws from torch's global RNG, so
``seed_everything`` makes a rollout reproducible. Positions are counted over real tokens, as the training forward
counts them (:func:`rlft.models.scoring.position_ids_from_mask`), so the rollout's log-probs are the ones the
update recomputes.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from rlft.generation.kv_cache import UPCAST_SDPA, cache_argument, preallocated_cache
from rlft.generation.lean_step import join_projections, lean_step
from rlft.generation.request import SampleRequest
from rlft.models.attention import SEGMENTED_SDPA
from rlft.models.scoring import plain_head, position_ids_from_mask
from rlft.models.unwrap import causal_lm

log = logging.getLogger(__name__)
_FORWARD_NOTED: set = set()


class NonFiniteLogitsError(ValueError, FloatingPointError):
    """The model produced logits no token can be drawn from (NaN or infinite): its weights diverged.

    A ``ValueError`` so that the CLI reports it as one line, like the training guard's ``NonFiniteError`` (which
    lives in the callbacks layer, above this one); a ``FloatingPointError`` for what it is. Weights can diverge to
    huge but finite values (learning rate 1e30), so the training guard's finiteness checks never fire; the logits
    they produce are where it shows."""


def _non_finite_message(rows: int) -> str:
    return (
        f"non-finite logits while sampling ({rows} row(s) of NaN/inf logits; the weights diverged: lower the "
        "learning rate, clip gradients, or check the model's weights)"
    )


# greedy decoding checks its picks every this many steps (and at the last): an argmax over NaN logits still returns
# an index inside the vocabulary, so nothing breaks in between, and the check's three small ops per step cost ~10 %
# of a tiny model's CPU step (sampling needs no extra op at all, see _draw)
GREEDY_CHECK_EVERY = 16


def _draw(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: torch.Tensor | None,
    check: bool = True,
):
    """Tokens ``[B]``, with ``V`` (one past the vocabulary) on rows whose logits give no distribution; no host sync.

    The marker lets :func:`decode` find such rows with the stop-token check it reads back anyway, instead of a
    second device sync per step (``torch.isfinite(logits).all()`` would be one, and would also flag the ``-inf``
    entries some models give tokens they never emit). ``check=False`` skips the marker for greedy decoding."""
    vocabulary = logits.shape[-1]
    if temperature == 0:
        if not check:
            return logits.argmax(-1)
        # argmax picks a NaN when the row has one; the picked logit is then NaN, +inf when the head overflowed, or
        # -inf when nothing is left: checking that one value per row costs O(B), not another pass over the vocabulary
        tokens = logits.argmax(-1)
        picked = logits.gather(-1, tokens[:, None]).squeeze(-1)
        return tokens.masked_fill_(torch.isfinite(picked).logical_not_(), vocabulary)
    scores = logits.float() if temperature == 1 else logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1)
        # drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        tail[:, -1] = False
        scores = scores.masked_fill(tail.scatter(-1, order, tail), float("-inf"))
    # inverse-CDF sampling, one uniform per row: torch.multinomial draws an exponential per vocabulary entry, which
    # took ~13 ms of a ~90 ms SmolLM2 decoding step on CPU. A float32 running sum of non-negative terms never
    # decreases, and u is kept strictly below the total, so the first entry whose cumulative mass exceeds u exists
    # and raised the sum, i.e. has non-zero probability (a float64 sum took 0.6 ms more per step at batch 16).
    cdf = scores.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    if uniforms is None:
        uniforms = torch.rand(cdf.shape[0], dtype=cdf.dtype, device=cdf.device)
    u = torch.minimum(uniforms.to(cdf).reshape(-1, 1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # a NaN or +inf logit, or a row of -inf, makes the whole softmax row NaN (top-k/top-p mask nothing in it, as NaN
    # compares false), so u is NaN too; searchsorted's binary search (shared by its CPU and CUDA kernels) then moves
    # right at every comparison and returns V, the marker, at no extra cost per step (this was the bare
    # IndexError of a diverged run). Pinned by tests/generation/test_decoder_finite.py in every sampling mode.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: greedy for ``temperature == 0``, else a draw from the tempered,
    top-k- then top-p-truncated distribution (the token that crosses the top-p mass is kept, as in ``generate``).

    ``uniforms [B]`` in [0, 1), when given, are the draws (a server gives each request its own seeded stream);
    otherwise they come from torch's global RNG.

    Raises:
        NonFiniteLogitsError: If a row's logits give no distribution (NaN or infinite: diverged weights). The
            check reads one flag per row back from the device; :func:`decode` folds it into the sync it makes
            anyway."""
    tokens = _draw(logits, temperature, top_k, top_p, uniforms)
    _raise_if_undefined(tokens, logits.shape[-1])
    return tokens


def _raise_if_undefined(tokens: torch.Tensor, vocabulary: int) -> None:
    undefined = int((tokens >= vocabulary).sum())
    if undefined:
        raise NonFiniteLogitsError(_non_finite_message(undefined))


def _lora_layers(model: torch.nn.Module) -> list | None:
    """The LoRA layers whose adapters can be folded into a plain float weight, or None when something cannot be
    (another tuner, DoRA, quantised base weights, a trained copy of a whole module). Under ZeRO-3 and FSDP2 this
    runs inside ``full_weights``, where every weight is whole on the rank (the parity tests decode merged there)."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return None
    if not isinstance(model, PeftModel):
        return None
    layers = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            return None
        if not isinstance(module, LoraLayer):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        plain = isinstance(module.get_base_layer(), torch.nn.Linear) and type(weight) is torch.nn.Parameter
        if not plain or not weight.is_floating_point() or module.merged or module.disable_adapters:
            return None
        if any(module.use_dora.get(name, False) for name in module.active_adapters):
            return None
        layers.append(module)
    return layers or None


@contextlib.contextmanager
def merged_adapter(model: torch.nn.Module) -> Iterator[bool]:
    """Inside, every adapted linear layer runs one matmul with ``W + s·BA`` (yields True) — or, when the model's
    adapters cannot be merged exactly, nothing changes (yields False). The original weight tensors are restored, not
    recomputed by subtraction, so merging never drifts the base model."""
    layers = _lora_layers(model)
    if layers is None:
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                active = [name for name in layer.active_adapters if name in layer.lora_A]
                delta = sum(layer.get_delta_weight(name) for name in active)
                saved.append((layer, weight, weight.data, list(layer.merged_adapters)))
                weight.data = (delta + weight.data).to(weight.dtype)  # one rounding for a bf16-stored base
                # peft's own "merged" state: its forward then calls only the base layer
                layer.merged_adapters = active
        yield True
    finally:
        for layer, weight, data, merged in saved:
            weight.data = data
            layer.merged_adapters = merged


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RELEASED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # twin -> its freed storages and their sizes


def decoding_twin(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A plain copy of the causal LM in ``dtype`` holding the policy's current weights, LoRA folded in.

    Built once per model (kept outside the module tree, so it is never saved, optimised or sharded), then refreshed
    by one converting copy per call: a bf16 twin of a fp32 policy decodes on half the memory traffic. Sampling from
    it is very slightly off the fp32 policy; the log-probs the update uses still come from the policy itself.
    """
    import transformers
    from peft.tuners.lora import LoraLayer

    lm = causal_lm(model)
    twin = _TWINS.get(model)
    if twin is None or next(twin.parameters()).dtype != dtype:
        # its own config: the policy's attention implementation must not change with the twin's
        config = copy.deepcopy(lm.config)
        sdpa = getattr(config, "_attn_implementation", None) in ("sdpa", SEGMENTED_SDPA)
        attention = {"attn_implementation": UPCAST_SDPA} if sdpa else {}
        # built empty: every weight is copied in below, so a random init would only cost time (~1.4 s for
        # SmolLM2) and shift the random stream, making a seeded first rollout differ from later ones
        with torch.device("meta"):
            twin = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
        twin = twin.to_empty(device=next(lm.parameters()).device)
        with torch.no_grad():
            for name, buffer in twin.named_buffers():  # rotary frequencies: computed at init, not copied below
                buffer.copy_(lm.get_buffer(name))
        twin.eval().requires_grad_(False)
        join_projections(twin)
        _TWINS[model] = twin
    if _lora_layers(model) is None and any(isinstance(m, LoraLayer) for m in lm.modules()):
        raise ValueError(
            "this adapter cannot be merged exactly (DoRA, quantised weights or "
            "modules_to_save): set decoder.decode_dtype: null"
        )
    for storage, nbytes in _RELEASED.pop(twin, []):  # released after the last rollout: rewritten whole below
        storage.resize_(nbytes)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            owner, _, leaf = name.rpartition(".")
            module = lm.get_submodule(owner)
            if not isinstance(module, LoraLayer):
                param.copy_(getattr(module, leaf))
                continue
            value = getattr(module.get_base_layer(), leaf)
            active = [name for name in module.active_adapters if name in module.lora_A]
            if leaf == "weight" and active:
                # W + s·BA, one layer at a time: the same sum merged_adapter forms, without holding a merged copy
                # of every adapted weight at once
                delta = module.get_delta_weight(active[0])
                for other in active[1:]:
                    delta = delta + module.get_delta_weight(other)
                value = delta.to(torch.promote_types(delta.dtype, value.dtype)).add_(value)
            param.copy_(value)
    return twin


def release_decoding_twin(model: torch.nn.Module) -> None:
    """Free the weights of ``model``'s decoding twin until :func:`decoding_twin` refreshes it (which rewrites every
    weight anyway), so they do not sit in memory through the update: its peak is the run's (SmolLM2 bf16 twin:
    0.27 GB). The twin must not be used before that refresh."""
    twin = _TWINS.get(model)
    if twin is None or twin in _RELEASED:
        return
    released = []
    for param in twin.parameters():
        storage = param.untyped_storage()
        if storage.nbytes():  # views of one storage (joined projections, tied weights) free it once
            released.append((storage, storage.nbytes()))
            storage.resize_(0)
    _RELEASED[twin] = released


def _prefill(lm: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Fill ``cache`` with the prompts; returns the logits ``[B, V]`` of each row's last position.

    The decoder stack, then the head on the last positions as one ``[B, H]`` matrix: the model's own
    ``logits_to_keep=1`` hands its head a strided ``[B, 1, H]`` slice, which ``torch.matmul`` multiplies by a
    batch-expanded copy of the head (``[B, H, V]``: 0.23 GB for SmolLM2 at 4 prompts, 0.13 s of a 0.23 s prefill).
    """
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
    head = plain_head(lm)
    if head is None:  # rescaled or capped logits: the model's forward
        return lm(**inputs, logits_to_keep=1, **cache_argument(lm, cache)).logits[:, -1]
    return head(lm.base_model(**inputs, **cache_argument(lm.base_model, cache)).last_hidden_state[:, -1])


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    pad_id: int,
    group_size: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lean: bool = True,
    on_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample ``group_size`` continuations of each left-padded prompt; returns ``[B * group_size, T]`` token ids
    (rows of one prompt contiguous, padded with ``pad_id`` after each row's stop token, ``T <= max_new_tokens``).

    ``lean`` decodes Llama-family models with :func:`rlft.generation.lean_step.lean_step` (the same arithmetic without
    the modeling code's per-token overhead); other models, or ``lean=False``, step through the model's forward.
    ``on_step`` sees each step's ``[B * group_size]`` tokens (``pad_id`` on rows that already stopped)."""
    step_options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    lm = causal_lm(model)  # peft's layers live inside it: its wrapper's forward adds only dispatch
    # a model that attends in fp32 keeps its cache in fp32: the new position is converted once, not the whole
    # cache at every layer of every step (CPU attention at batch 16: 93 instead of 176 us per layer)
    upcast = getattr(lm.config, "_attn_implementation", None) == UPCAST_SDPA
    cache = preallocated_cache(lm.config, prompt_ids.shape[1] + max_new_tokens, torch.float32 if upcast else None)
    cache_arg = cache_argument(lm, cache)
    step_forward = lean_step(lm, cache) if lean else None
    if step_forward is None:
        if lean and lm.config.model_type not in _FORWARD_NOTED:
            _FORWARD_NOTED.add(lm.config.model_type)
            log.info(
                "rlft decoder: no lean step for this %s model (architecture, sliding-window cache or weights it "
                "cannot read as plain tensors); decoding through its forward",
                lm.config.model_type,
            )

        def step_forward(tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return lm(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **cache_arg
            ).logits[:, -1]

    logits = _prefill(lm, prompt_ids, prompt_mask, cache)
    mask = prompt_mask
    if group_size > 1:
        cache.batch_repeat_interleave(group_size)
        logits, mask = logits.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    rows = mask.shape[0]
    tokens_out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=prompt_ids.device)
    active = torch.arange(rows, device=prompt_ids.device)
    positions = mask.sum(-1, keepdim=True)
    # the vocabulary size is _draw's marker of a row without a distribution: it "stops" the row, so the stop check's
    # read-back (the one device sync of a step) also notices diverged logits
    vocabulary = logits.shape[-1]
    stops = torch.tensor([*stop_ids, vocabulary], device=prompt_ids.device)
    width = 0
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        tokens = _draw(logits, uniforms=None, check=last or step % GREEDY_CHECK_EVERY == 0, **step_options)
        stopped = None if last else torch.isin(tokens, stops)
        any_stopped = not last and bool(stopped.any())
        if last or any_stopped:  # before on_step or the output sees the marker
            _raise_if_undefined(tokens, vocabulary)
        tokens_out[active, step] = tokens
        width = step + 1
        if on_step is not None:
            on_step(tokens_out[:, step])
        if last:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        if any_stopped:
            keep = (~stopped).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            active, tokens, mask, positions = active[keep], tokens[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        logits = step_forward(tokens, mask, positions)
        positions = positions + 1
    return tokens_out[:, :width]


def decoder_sample(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, request: SampleRequest
) -> torch.Tensor:
    """The ``rlft`` sampling backend: :func:`decode` under the one backend signature (``options["lean"]``, default
    True; ``top_k`` None takes the model's generation config, as ``model.generate`` would; stop strings do not end
    a row early here, the caller's cut removes what follows them)."""
    top_k = request.top_k
    if top_k is None:
        top_k = getattr(getattr(causal_lm(model), "generation_config", None), "top_k", None) or 0
    on_step = None
    if request.on_token is not None:

        def on_step(column: torch.Tensor) -> None:
            for row, token in enumerate(column.tolist()):
                request.on_token(row, token)

    return decode(
        model,
        prompt_ids,
        prompt_mask,
        max_new_tokens=request.max_new_tokens,
        stop_ids=request.stop_ids,
        pad_id=request.pad_id,
        group_size=request.group_size,
        temperature=request.temperature,
        top_k=top_k,
        top_p=request.top_p,
        lean=request.options.get("lean", True),
        on_step=on_step,
    )
