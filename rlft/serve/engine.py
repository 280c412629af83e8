"""The serving engine: requests queue up, are collected for a few milliseconds and run as one batched generate
(in chunks of at most ``max_batch_size`` rows, however many prompts x ``n`` a request asks for).

Generation itself is rlft's :class:`~rlft.generation.generator.Generator` (the same batched loop evaluation uses, HF or
vLLM backend); the engine only groups requests that share sampling settings, feeds each group to the generator in
one call, and turns the per-token callback into text deltas (for streaming), finish reasons and token counts. Replies
end at the tokens of :func:`rlft.models.tokens.stop_token_ids`, as in training and evaluation.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from rlft.generation.generator import Generator, Prompt, cut_at_stop, encode_prompt_text
from rlft.generation.settings import SamplingSettings
from rlft.models.tokens import pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

DeltaCallback = Callable[[int, str], None]  # (choice index, new text), called from the engine's thread


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)


class _GroupCancelled(Exception):
    """Raised from the token callback to end a generate call nobody waits for any more."""


@dataclass
class _Request:
    prompts: list[Prompt]
    settings: SamplingSettings
    seed: int | None
    on_delta: DeltaCallback | None
    future: Future
    prompt_tokens: int

    def key(self) -> tuple:
        s = self.settings
        return (
            s.max_new_tokens,
            s.temperature,
            s.top_p if s.temperature > 0 else 1.0,
            s.num_samples,
            tuple(s.stop),
            self.seed,
        )


@dataclass
class _Row:
    """One sample being generated: its tokens so far and what has been streamed of it."""

    tokens: list[int] = field(default_factory=list)
    finished_by_token: bool = False
    done: bool = False
    emitted: str = ""


class Engine:
    """Batched generation behind the HTTP server.

    Args:
        generator: The shared generator (HF or vLLM backend).
        tokenizer: Its tokenizer.
        max_context: Longest prompt + completion the model takes, in tokens.
        batch_window_ms: How long the first request of a batch waits for others to join it.
        max_batch_size: Most samples (prompts x n) generated in one call.
    """

    def __init__(
        self,
        generator: Generator,
        tokenizer,
        *,
        max_context: int,
        batch_window_ms: float = 10.0,
        max_batch_size: int = 32,
    ) -> None:
        self.generator, self.tokenizer, self.max_context = generator, tokenizer, max_context
        self.batch_window, self.max_batch_size = batch_window_ms / 1000, max_batch_size
        self.stop_ids = set(stop_token_ids(tokenizer, generator.model)) | {pad_token_id(tokenizer)}
        self.batches: list[int] = []  # requests per generate call, for tests and logs
        self.cancelled = 0  # requests whose generate call stopped early because every client of it went away
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rlft-serve-engine", daemon=True)
        self._thread.start()

    @property
    def backend_name(self) -> str:
        return f"{self.generator.backend_name}, windowed batching"

    def stats(self) -> dict:
        """Counters for ``/health``: generate calls and the requests they served."""
        return {
            "generate_calls": len(self.batches),
            "requests_served": sum(self.batches),
            "requests_cancelled": self.cancelled,
        }

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
        ``p * n + j`` is sample ``j`` of prompt ``p``). Cancelling the future stops the generate call at the next
        token once every request sharing it is cancelled. ``encoded`` is accepted for the continuous engine's
        signature; the generator tokenises on its own."""
        future: Future = Future()
        tokens = prompt_tokens if prompt_tokens is not None else sum(self.count_tokens(p) for p in prompts)
        self._queue.put(_Request(list(prompts), settings, seed, on_delta, future, tokens))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (first := self._queue.get()) is not None:
            pending = [first]
            size = len(first.prompts) * first.settings.num_samples
            deadline = time.monotonic() + self.batch_window
            while size < self.max_batch_size and (wait := deadline - time.monotonic()) > 0:
                try:
                    request = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
                if request is None:
                    self._queue.put(None)  # stop after this batch
                    break
                pending.append(request)
                size += len(request.prompts) * request.settings.num_samples
            groups: dict[tuple, list[_Request]] = {}
            for request in pending:
                groups.setdefault(request.key(), []).append(request)
            for group in groups.values():
                self._run(group)

    def _run(self, group: list[_Request]) -> None:
        settings = group[0].settings
        n, greedy = settings.num_samples, settings.temperature == 0
        owners = [(request, p) for request in group for p in range(len(request.prompts))]
        rows = {(i, j): _Row() for i in range(len(owners)) for j in range(n)}
        hold_back = max((len(s) for s in settings.stop), default=1) - 1

        def on_token(prompt: int, sample: int, token: int) -> None:
            if all(request.future.done() for request in group):  # every client went away: stop generating
                raise _GroupCancelled
            row = rows[(prompt, sample)]
            if row.done:
                return
            row.tokens.append(token)
            if token in self.stop_ids:
                row.done = row.finished_by_token = True
                return
            request, p = owners[prompt]
            if request.on_delta is None:
                return
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = cut_at_stop(text, settings.stop)
            safe = cut if len(cut) < len(text) else cut[: len(cut) - hold_back] if hold_back else cut
            safe = safe.rstrip("\ufffd")  # an incomplete UTF-8 sequence waits for its next token
            if len(safe) > len(row.emitted) and safe.startswith(row.emitted):
                delta, row.emitted = safe[len(row.emitted) :], safe
                for j in range(n) if greedy else (sample,):
                    request.on_delta(p * n + j, delta)

        seed = group[0].seed if group[0].seed is not None else random.randrange(2**31)
        run_settings = replace(settings, seed=seed)
        try:  # rows = prompts x samples per prompt: no forward holds more than max_batch_size rows
            outputs = self.generator.generate(
                [r.prompts[p] for r, p in owners], run_settings, on_token=on_token, batch_size=self.max_batch_size
            )
        except _GroupCancelled:
            self.cancelled += len(group)
            return
        except Exception as error:  # noqa: BLE001 - every waiting client gets the error, the server goes on
            log.exception("generation failed")
            for request in group:
                if not request.future.done():  # a cancelled future (the client went away) takes no result
                    request.future.set_exception(error)
            return
        self.batches.append(len(group))
        i = 0  # index of the request's first prompt in the batch
        for request in group:
            choices = []
            for p in range(len(request.prompts)):
                for j in range(n):
                    row = rows[(i + p, 0 if greedy else j)]
                    text = outputs[i + p][j]
                    if request.on_delta is not None and text.startswith(row.emitted) and len(text) > len(row.emitted):
                        request.on_delta(p * n + j, text[len(row.emitted) :])
                    ended_early = row.finished_by_token or len(row.tokens) < settings.max_new_tokens
                    cut_by_stop = len(text) < len(self.tokenizer.decode(row.tokens, skip_special_tokens=True))
                    reason = "stop" if ended_early or cut_by_stop else "length"
                    choices.append(Choice(p * n + j, text, reason, len(row.tokens)))
            i += len(request.prompts)
            if not request.future.done():
                request.future.set_result(Completion(choices, request.prompt_tokens))
