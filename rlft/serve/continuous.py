"""Continuous batching: requests join and leave one running decode batch between tokens.

The windowed :class:`~rlft.serve.engine.Engine` runs a batch to its end, so a request that arrives one token
after a batch started waits for the whole batch, and a batch runs as long as its longest reply. Here one thread
owns a single batch of rows (one row per sample being generated) and, between two decode steps:

- **admits** waiting rows, oldest request first, up to ``max_batch_size`` rows: their prompts are prefilled together
  in one forward, then their KV cache is merged into the running one (:func:`~rlft.serve.rows.merge_rows`). A
  request with more rows (prompts x ``n``) than the batch holds is admitted in chunks as rows retire, so no request
  can make the batch, its KV cache or the server's memory larger than ``max_batch_size`` rows;
- **samples** one token per row, each request with its own settings and its own seeded random stream;
- **retires** rows that hit a stop token, a stop string or their ``max_tokens``, answering a request as soon as
  its last row retires, and drops them from the batch and the cache; the rows of a cancelled request (its client
  went away) retire at the next step.

Rows are left-padded to one common cache length; positions are counted over real tokens (as in training and the
rollout decoder), so padding never shifts a row's positions. A LoRA adapter is merged into the weights once for the
engine's lifetime (:func:`rlft.generation.decoder.merged_adapter`: exact up to float rounding), and Llama-family models
decode through the rollout decoder's lean step (:func:`rlft.generation.lean_step.lean_step`). Models whose cache has
layers other than full attention (sliding windows) are served by the windowed engine instead
(:func:`supports_continuous`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from rlft.generation.decoder import merged_adapter, sample_tokens
from rlft.generation.generator import Prompt, cut_at_stop, encode_prompt_text
from rlft.generation.kv_cache import PreallocatedLayer, cache_argument, preallocated_cache
from rlft.generation.lean_step import lean_step
from rlft.generation.settings import SamplingSettings
from rlft.models.scoring import position_ids_from_mask
from rlft.models.tokens import pad_token_id, stop_token_ids
from rlft.models.unwrap import causal_lm
from rlft.serve.engine import Choice, Completion, DeltaCallback
from rlft.serve.rows import Batch, Request, Row, merge_rows

log = logging.getLogger(__name__)


def supports_continuous(model: torch.nn.Module) -> bool:
    """Every cache layer of the model is plain full attention, which rows can join and leave."""
    cache = preallocated_cache(causal_lm(model).config, 1)
    return bool(cache.layers) and all(type(layer) is PreallocatedLayer for layer in cache.layers)


class ContinuousEngine:
    """Continuous-batching generation behind the HTTP server (rlft's own decoder; CPU or GPU).

    Args:
        model: A loaded causal LM (``PreTrainedModel`` or ``PeftModel``) in eval mode.
        tokenizer: Its tokenizer.
        max_context: Longest prompt + completion the model takes, in tokens.
        max_batch_size: Most rows (samples) decoded together; more requests wait for rows to retire.
    """

    backend_name = "rlft continuous batching"

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_context: int, max_batch_size: int = 32) -> None:
        if not supports_continuous(model):
            raise ValueError(
                "continuous batching needs a model whose every layer is full attention; "
                "use the windowed Engine (rlft serve --batching window)"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_context, self.max_batch_size = max_context, max_batch_size
        self.lm = causal_lm(model)
        self.device = next(model.parameters()).device
        self.stop_ids = set(stop_token_ids(tokenizer, model)) | {pad_token_id(tokenizer)}
        self.pad_id = pad_token_id(tokenizer)
        self.counts = {
            "requests_served": 0,
            "requests_cancelled": 0,
            "decode_steps": 0,
            "row_steps": 0,
            "prefills": 0,
            "peak_rows": 0,
        }
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._waiting: deque[Request] = deque()
        self._batch: Batch | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="rlft-serve-continuous", daemon=True)
        self._thread.start()

    def stats(self) -> dict:
        """Counters for ``/health``: requests answered, decode steps, rows decoded (mean rows per step =
        ``row_steps / decode_steps``), prefill forwards and the most rows decoded together."""
        return dict(self.counts)

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, encoded exactly as generation encodes it."""
        return encode_prompt_text(self.tokenizer, prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        """Prompt length in tokens."""
        return len(self.encode(prompt))

    def submit(
        self,
        prompts: Sequence[Prompt],
        settings: SamplingSettings,
        *,
        seed: int | None = None,
        on_delta: DeltaCallback | None = None,
        prompt_tokens: int | None = None,
        encoded: Sequence[list[int]] | None = None,
    ) -> Future:
        """Queue a request; the future resolves to a :class:`Completion` with ``len(prompts) * n`` choices (choice
        ``p * n + j`` is sample ``j`` of prompt ``p``). Cancelling the future (a client that went away) drops the
        request's rows from the batch at the next token. ``encoded`` (each prompt's :meth:`encode`) saves the decode
        thread from tokenising again what the caller already tokenised."""
        future: Future = Future()
        encoded = list(encoded) if encoded is not None else [self.encode(p) for p in prompts]
        if prompt_tokens is None:
            prompt_tokens = sum(len(ids) for ids in encoded)
        rng = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**63))
        self._queue.put(Request(list(prompts), settings, on_delta, future, prompt_tokens, rng, encoded))
        return future

    def close(self) -> None:
        """Answer what is running, refuse what waits, stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    # -- the decode thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(merged_adapter(self.model))
            while not (self._closing and self._batch is None):
                self._receive(block=self._batch is None and not self._waiting)
                try:
                    self._admit()
                    if self._batch is not None:
                        self._step()
                except Exception as error:  # noqa: BLE001 - every request in flight gets the error, the server goes on
                    log.exception("generation failed")
                    self._fail(error)
        for request in self._waiting:
            if not request.future.done():
                request.future.set_exception(RuntimeError("the server is shutting down"))

    def _receive(self, *, block: bool) -> None:
        while not self._closing:
            try:
                request = self._queue.get(block=block)
            except queue.Empty:
                return
            if request is None:
                self._closing = True
            else:
                self._waiting.append(request)
            block = False

    def _admit(self) -> None:
        """Prefill the waiting rows that fit (oldest request first; a request larger than the room left is admitted
        in part, the rest of it when rows retire) and merge them into the running batch."""
        room = self.max_batch_size - (len(self._batch.rows) if self._batch is not None else 0)
        taken: list[Row] = []
        while self._waiting and room > 0 and not self._closing:
            request = self._waiting[0]
            if request.future.done():  # cancelled by its client, or failed, while (part of) it waited
                self._waiting.popleft()
                self._note_cancelled(request)
                continue
            chunk = request.rows[request.admitted : request.admitted + room]
            taken += chunk
            request.admitted += len(chunk)
            room -= len(chunk)
            if request.admitted == len(request.rows):
                self._waiting.popleft()
        if not taken:
            return
        try:
            incoming = self._prefill(taken)
        except Exception as error:  # noqa: BLE001 - a bad request fails alone, the running rows go on
            log.exception("prefill failed")
            for request in {id(row.request): row.request for row in taken}.values():
                if not request.future.done():
                    request.future.set_exception(error)
            return
        self._batch = incoming if self._batch is None else merge_rows(self._batch, incoming)
        self.counts["peak_rows"] = max(self.counts["peak_rows"], len(self._batch.rows))

    def _prefill(self, rows: list[Row]) -> Batch:
        """One forward over the distinct prompts of ``rows`` (consecutive rows of one prompt share it), then the cache
        rows repeated so each sample has its own."""
        encoded, repeats = [], []
        for i, row in enumerate(rows):
            if i and rows[i - 1].request is row.request and rows[i - 1].prompt == row.prompt:
                repeats[-1] += 1
                continue
            encoded.append(row.request.encoded[row.prompt])
            repeats.append(1)
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, tokens in enumerate(encoded):
            ids[i, width - len(tokens) :] = torch.tensor(tokens)
            mask[i, width - len(tokens) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = preallocated_cache(self.lm.config, width + max(row.budget for row in rows))
        logits = self.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=True,
            logits_to_keep=1,
            **cache_argument(self.lm, cache),
        ).logits[:, -1]
        self.counts["prefills"] += 1
        positions = mask.sum(-1, keepdim=True)
        if any(r > 1 for r in repeats):
            index = torch.repeat_interleave(
                torch.arange(len(encoded), device=self.device), torch.tensor(repeats, device=self.device)
            )
            cache.batch_select_indices(index)
            mask, positions, logits = mask[index], positions[index], logits[index]
        return Batch(rows, cache, mask, positions, logits)

    def _step(self) -> None:
        """Sample a token for every row, retire finished rows, and run the forward that gives the next logits."""
        batch = self._batch
        tokens = self._sample(batch)
        self.counts["decode_steps"] += 1
        self.counts["row_steps"] += len(batch.rows)
        alive = [
            i
            for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True))
            if not self._advance(row, token)
        ]
        if not alive:
            self._batch = None
            return
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        if len(alive) < len(batch.rows):
            keep = torch.tensor(alive, device=self.device)
            batch.cache.batch_select_indices(keep)
            tokens, mask, batch.positions = tokens[keep], mask[keep], batch.positions[keep]
            batch.rows = [batch.rows[i] for i in alive]
        batch.mask = mask
        if batch.step is None:  # it reads the cache's layers at each call, so it survives merges and row drops
            batch.step = lean_step(self.lm, batch.cache) or False
        if batch.step:
            batch.logits = batch.step(tokens, mask, batch.positions)
        else:
            batch.logits = self.lm(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=batch.positions,
                use_cache=True,
                **cache_argument(self.lm, batch.cache),
            ).logits[:, -1]
        batch.positions = batch.positions + 1

    def _sample(self, batch: Batch) -> torch.Tensor:
        tokens = torch.empty(len(batch.rows), dtype=torch.long, device=self.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for i, row in enumerate(batch.rows):
            s = row.request.settings
            groups.setdefault((s.temperature, s.top_p if s.temperature > 0 else 1.0), []).append(i)
        for (temperature, top_p), index in groups.items():
            uniforms = None
            if temperature > 0:  # each request's rows draw, in row order, from that request's own stream
                uniforms = torch.cat(
                    [torch.rand(1, generator=batch.rows[i].request.rng, dtype=torch.float64) for i in index]
                )
            picked = torch.tensor(index, device=self.device)
            tokens[picked] = sample_tokens(
                batch.logits[picked], temperature=temperature, top_p=top_p, uniforms=uniforms
            )
        return tokens

    def _advance(self, row: Row, token: int) -> bool:
        """Add ``token`` to ``row`` and stream what became final; True when the row has finished."""
        settings = row.request.settings
        if row.request.future.done():  # cancelled by its client, or failed
            return self._retire(row, "")
        row.tokens.append(token)
        if token in self.stop_ids:
            row.finish_reason = "stop"
            return self._retire(row, self.tokenizer.decode(row.tokens[:-1], skip_special_tokens=True))
        needs_text = settings.stop or row.request.on_delta is not None or row.budget == 0
        if not needs_text:
            return False
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if (cut := cut_at_stop(text, settings.stop)) != text:
            row.finish_reason = "stop"
            return self._retire(row, text)
        if row.budget == 0:
            row.finish_reason = "length"
            return self._retire(row, text)
        hold_back = max((len(s) for s in settings.stop), default=1) - 1  # a stop string may be starting
        safe = (cut[: len(cut) - hold_back] if hold_back else cut).rstrip("\ufffd")  # wait for whole characters
        self._emit(row, safe)
        return False

    def _emit(self, row: Row, text: str) -> None:
        request = row.request
        if request.on_delta is None or len(text) <= len(row.emitted) or not text.startswith(row.emitted):
            return
        delta, row.emitted = text[len(row.emitted) :], text
        n = request.settings.num_samples
        for j in range(n) if request.greedy else (row.sample,):
            request.on_delta(row.prompt * n + j, delta)

    def _retire(self, row: Row, text: str) -> bool:
        request = row.request
        if request.future.done():
            self._note_cancelled(request)
            return True
        row.text = cut_at_stop(text, request.settings.stop)
        self._emit(row, row.text)
        if all(r.finish_reason is not None for r in request.rows):
            n = request.settings.num_samples
            choices = [
                Choice(p * n + j, r.text, r.finish_reason, len(r.tokens))
                for r in request.rows
                for p in (r.prompt,)
                for j in (range(n) if request.greedy else (r.sample,))
            ]
            choices.sort(key=lambda c: c.index)
            self.counts["requests_served"] += 1
            request.future.set_result(Completion(choices, request.prompt_tokens))
        return True

    def _note_cancelled(self, request: Request) -> None:
        if request.future.cancelled() and not request.dropped:
            request.dropped = True
            self.counts["requests_cancelled"] += 1

    def _fail(self, error: Exception) -> None:
        if self._batch is not None:
            for request in {id(row.request): row.request for row in self._batch.rows}.values():
                if not request.future.done():
                    request.future.set_exception(error)
        self._batch = None
