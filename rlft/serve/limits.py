"""What one request may ask of the server, checked before any work is queued.

A single HTTP call must not be able to take the server's memory or its event loop: the body is capped before it is
parsed (:class:`BodySizeLimit`, 413), and after parsing the prompt count, ``n``, the prompt text's size and the
token budget are checked against :class:`RequestLimits` (400/413 with an OpenAI-style error body naming the field,
the value and the limit). Rows (prompts x ``n``) beyond ``--max_batch_size`` are not refused: the engines decode them
in chunks of the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException

from rlft.serve.protocol import APIError

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed and numpy both take it; larger seeds were a 500


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits of ``rlft serve`` (each one a ``--flag`` of the same name).

    Args:
        max_prompts_per_request: Most prompts in one ``/v1/completions`` call (a chat request is one prompt).
        max_n: Most choices per prompt (``n``).
        max_prompt_bytes: Most UTF-8 bytes of prompt text in one request (all prompts or messages together).
    """

    max_prompts_per_request: int = 64
    max_n: int = 16
    max_prompt_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("max_prompts_per_request", "max_n", "max_prompt_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        """The HTTP body cap: room for the prompt text JSON-escaped (a non-ASCII character may take 6 bytes for its
        3 in UTF-8, i.e. 2x; 4x leaves room for message framing) plus the other fields."""
        return 4 * self.max_prompt_bytes + (64 << 10)

    def check(self, prompts: list, n: int, *, param: str) -> None:
        """Refuse a request whose prompt count, ``n`` or prompt size is over the limits (before any tokenising)."""
        if len(prompts) > self.max_prompts_per_request:
            raise APIError(
                400,
                f"'{param}' has {len(prompts)} prompts; this server takes at most "
                f"{self.max_prompts_per_request} per request (rlft serve --max_prompts_per_request): "
                "send them in several requests",
                param=param,
            )
        if n > self.max_n:
            raise APIError(400, f"'n' is {n}; this server takes at most {self.max_n} (rlft serve --max_n)", param="n")
        size = sum(prompt_bytes(p) for p in prompts)
        if size > self.max_prompt_bytes:
            raise APIError(
                413,
                f"the prompt text is {size:,} bytes; this server takes at most "
                f"{self.max_prompt_bytes:,} per request (rlft serve --max_prompt_bytes)",
                param=param,
                code="prompt_too_large",
            )


def prompt_bytes(prompt: str | list[dict]) -> int:
    """UTF-8 size of a prompt string, or of every message's content."""
    if isinstance(prompt, str):
        return len(prompt.encode())
    return sum(len(str(m.get("content") or "").encode()) for m in prompt)


class BodyTooLarge(HTTPException):
    """Raised while the body is read; an ``HTTPException`` so FastAPI's body parsing passes it on unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than {limit:,} bytes, the most this server reads "
            "(rlft serve --max_prompt_bytes sets it)",
        )


class BodySizeLimit:
    """ASGI middleware that refuses a body over ``max_bytes``: by its ``Content-Length`` before a byte is read, or
    (chunked uploads) as soon as the bytes received pass the limit, so a huge body is never buffered or parsed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(send, BodyTooLarge(self.max_bytes))
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, error: BodyTooLarge) -> None:
    import json

    from rlft.serve.protocol import error_body

    body = json.dumps(error_body(error.detail, code="request_too_large")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
