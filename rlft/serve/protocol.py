"""The OpenAI request bodies rlft serves (the fields that change the output; other fields clients send are ignored)
and the response objects, as the ``openai`` client parses them."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls (checked by rlft.data.tool_messages)
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    def as_dict(self) -> dict:
        """``{"role", "content"}`` with text parts joined (the form chat templates take), plus an assistant's
        ``tool_calls`` and a tool message's ``tool_call_id`` / ``name``."""
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.text or "" for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.role == "tool":
            message.update({k: v for k, v in (("tool_call_id", self.tool_call_id), ("name", self.name)) if v})
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. presence_penalty, user: accepted, not used
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)  # the upper limit is the server's --max_n (rlft.serve.limits)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)  # what torch's generators take

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise ValueError("'stop' takes at most 4 sequences")
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict] | None = None  # JSON schemas, shown to the model (rlft.serve.tool_use)
    tool_choice: str | dict | None = None  # "auto" (the default with tools) or "none"; others are refused


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(object_type: str, request_id: str, model: str, choices: list[dict], **extra) -> dict:
    return {
        "id": request_id,
        "object": object_type,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
