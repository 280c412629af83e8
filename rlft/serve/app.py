"""An OpenAI-compatible HTTP API over the serving engine: ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, plain JSON or streamed as server-sent events, with OpenAI-style 4xx errors. Chat requests may
offer ``tools`` and carry tool calls and results (:mod:`rlft.serve.tool_use`); a streamed reply that may hold calls
is sent as one delta at its end, once it can be read whole."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from rlft.generation.settings import SamplingSettings
from rlft.serve.continuous import ContinuousEngine
from rlft.serve.engine import Choice, Completion, Engine
from rlft.serve.limits import BodySizeLimit, BodyTooLarge, RequestLimits
from rlft.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    envelope,
    error_body,
    new_id,
    usage,
)
from rlft.serve.tool_use import chat_prompt, parses_calls, reply_message, request_messages, request_tools

DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there
TOKENIZER_THREADS = 2  # prompts are rendered and tokenised here, off the event loop; more would only contend


def create_app(
    engine: Engine | ContinuousEngine,
    model_name: str,
    *,
    default_max_tokens: int = 256,
    limits: RequestLimits | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine`` under the model name ``model_name``, refusing requests over
    ``limits`` (:class:`~rlft.serve.limits.RequestLimits`; its defaults when not given)."""
    limits = limits or RequestLimits()
    app = FastAPI(title="rlft serve", description=f"OpenAI-compatible API for {model_name}")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    created = int(time.time())
    # rendering and tokenising a 1 MB prompt takes a good part of a second: on the event loop it would stall every
    # other client (and /health) for that long
    tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="rlft-serve-tokenize")
    app.router.on_shutdown.append(lambda: tokenizing.shutdown(wait=False, cancel_futures=True))
    context = _Context(engine, model_name, default_max_tokens, limits, tokenizing)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error_body(error.message, param=error.param, code=error.code), status_code=error.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, error: BodyTooLarge) -> JSONResponse:
        return JSONResponse(error_body(error.detail, code="request_too_large"), status_code=413)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors())
        return JSONResponse(error_body(f"invalid request: {problems}"), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        """Liveness plus the engine's batching counters (requests served, and how they shared forwards)."""
        return {"status": "ok", "engine": engine.backend_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        _check_model(name, model_name)
        return _model_card(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        tools = request_tools(body)
        try:
            prompt = request_messages(body)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from error
        max_tokens = body.max_completion_tokens or body.max_tokens
        tokenizer, parse = engine.tokenizer, parses_calls(body, tools)
        return await _complete(
            context,
            body,
            [prompt],
            max_tokens,
            request,
            chat=True,
            render=lambda messages: chat_prompt(tokenizer, messages, tools),
            read=lambda c: reply_message(c.text, c.finish_reason, tokenizer, parse),
            whole=parse,
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        if body.echo:
            raise APIError(400, "'echo' is not supported", param="echo")
        return await _complete(context, body, prompts, body.max_tokens, request, chat=False)

    return app


class _Context:
    """What every request handler needs from :func:`create_app`."""

    def __init__(
        self, engine, model_name: str, default_max_tokens: int, limits: RequestLimits, tokenizing: ThreadPoolExecutor
    ) -> None:
        self.engine, self.model_name, self.default_max_tokens = engine, model_name, default_max_tokens
        self.limits, self.tokenizing = limits, tokenizing


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "rlft"}


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


def _plain(choice: Choice) -> tuple[dict, str]:
    return {"role": "assistant", "content": choice.text}, choice.finish_reason


async def _complete(
    ctx: _Context,
    body,
    prompts: list,
    max_tokens: int | None,
    request: Request,
    *,
    chat: bool,
    render: Callable | None = None,
    read: Callable[[Choice], tuple[dict, str]] = _plain,
    whole: bool = False,
):
    """Generate for ``prompts``: ``render`` turns each into what the engine takes (off the event loop), ``read`` a
    chat choice into its message and finish reason, and ``whole`` streams each reply as one delta at its end."""
    engine, param = ctx.engine, "messages" if chat else "prompt"
    ctx.limits.check(prompts, body.n, param=param)
    try:
        stop = body.stop_list()
    except ValueError as error:
        raise APIError(400, str(error), param="stop") from error
    loop = asyncio.get_running_loop()

    def prepare() -> tuple[list, list[list[int]]]:
        ready = [render(p) for p in prompts] if render else prompts
        return ready, [engine.encode(p) for p in ready]

    try:
        prompts, encoded = await loop.run_in_executor(ctx.tokenizing, prepare)
    except Exception as error:  # noqa: BLE001 - e.g. a chat template that rejects the roles it was given
        raise APIError(400, f"could not render the prompt: {error}", param=param) from error
    counts = [len(ids) for ids in encoded]
    if min(counts) == 0:
        raise APIError(400, "a prompt encodes to no tokens: give at least one", param=param)
    longest = max(counts)
    if max_tokens is None:  # no budget given: the default, shortened to what the context leaves (as OpenAI does)
        max_tokens = max(1, min(ctx.default_max_tokens, engine.max_context - longest))
    if longest + max_tokens > engine.max_context:
        which = f" (prompt {counts.index(longest)} is the longest)" if len(prompts) > 1 else ""
        raise APIError(
            400,
            f"This model's maximum context length is {engine.max_context} tokens. However, you "
            f"requested {longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} "
            f"in the completion){which}. Please reduce the prompt or max_tokens.",
            param="max_tokens" if longest < engine.max_context else param,
            code="context_length_exceeded",
        )
    settings = SamplingSettings(
        max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, num_samples=body.n, stop=stop
    )
    request_id = new_id("chatcmpl" if chat else "cmpl")
    kind = "chat.completion" if chat else "text_completion"
    if not body.stream:
        future = engine.submit(prompts, settings, seed=body.seed, prompt_tokens=sum(counts), encoded=encoded)
        result = await _result_unless_disconnected(future, request)
        if result is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        choices = []
        for c in result.choices:
            message, reason = read(c) if chat else (None, c.finish_reason)
            text = {"message": message} if chat else {"text": c.text}
            choices.append({"index": c.index, "finish_reason": reason, "logprobs": None, **text})
        return envelope(
            kind, request_id, ctx.model_name, choices, usage=usage(result.prompt_tokens, result.completion_tokens)
        )
    events: asyncio.Queue = asyncio.Queue()
    future = engine.submit(
        prompts,
        settings,
        seed=body.seed,
        prompt_tokens=sum(counts),
        encoded=encoded,
        on_delta=lambda index, text: loop.call_soon_threadsafe(events.put_nowait, (index, text)),
    )
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _events(events, future, request_id, ctx.model_name, len(prompts) * body.n, chat, include_usage, read, whole),
        media_type="text/event-stream",
    )


async def _result_unless_disconnected(future: Future, request: Request) -> Completion | None:
    """The engine's answer, or None once the client has gone: then the request is cancelled, and the engine drops
    its rows at the next decoding step instead of generating for nobody."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            future.cancel()
            return None


async def _events(
    events: asyncio.Queue,
    future,
    request_id: str,
    model_name: str,
    n_choices: int,
    chat: bool,
    include_usage: bool,
    read: Callable[[Choice], tuple[dict, str]] = _plain,
    whole: bool = False,
):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps(envelope(kind, request_id, model_name, choices, **extra))}\n\n"

    def choice(index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if not chat:
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    if chat:
        yield chunk([choice(i, None, role=True) for i in range(n_choices)])
    try:
        while (event := await events.get()) is not None:
            if not whole:  # a reply that may hold tool calls is read whole first: it is sent at the end
                yield chunk([choice(event[0], event[1])])
    finally:  # the client went away mid-stream: stop generating for it
        future.cancel()
    error = future.exception()
    if error is not None:
        yield f"data: {json.dumps(error_body(f'generation failed: {error}', kind='server_error'))}\n\n"
        return
    result: Completion = future.result()
    reasons = {c.index: c.finish_reason for c in result.choices}
    if whole:
        for c in result.choices:
            message, reasons[c.index] = read(c)
            delta = {k: v for k, v in message.items() if k != "role" and v is not None}
            if "tool_calls" in delta:  # a streamed call names its place in the list
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
            yield chunk([{"index": c.index, "delta": delta, "finish_reason": None, "logprobs": None}])
    yield chunk([choice(c.index, None if chat else "", reasons[c.index]) for c in result.choices])
    if include_usage:
        yield chunk([], usage=usage(result.prompt_tokens, result.completion_tokens))
    yield "data: [DONE]\n\n"
