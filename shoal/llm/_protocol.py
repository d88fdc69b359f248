"""The OpenAI wire format: request models, response bodies, stream chunks, errors.

Field names, defaults and error shapes follow OpenAI's API reference, so the official clients
work unchanged. Fields the gateway does not implement are rejected with a 400 naming the
field (never silently ignored) when they would change the result (``n > 1``, ``logprobs``,
``tools``, ``echo``, ``suffix``, JSON mode); unknown extra fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shoal.llm.engines import SamplingParams

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "OpenAIError",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "parse_request",
    "sse",
]


class OpenAIError(Exception):
    """An error the gateway answers in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.status, self.message, self.type, self.code, self.param, self.headers))


def _rebuild_error(status: int, message: str, type: str, code: str | None, param: str | None,
                   headers: dict[str, str]) -> OpenAIError:
    return OpenAIError(status, message, type=type, code=code, param=param, headers=headers)


#: ``seed`` is an int64 (OpenAI's and vLLM's type; torch's ``manual_seed`` rejects larger values).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Request(BaseModel):
    # Clients send fields this gateway does not know (e.g. `user`, `metadata`): ignore them.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class _Sampling(_Request):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    #: vLLM's extension: keep generating past the end-of-sequence token.
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stop_list(), seed=self.seed, ignore_eos=self.ignore_eos,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)


def _unsupported(value: Any) -> Any:
    if value not in (None, False, [], {}):
        raise ValueError("is not supported by this gateway")
    return value


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs", "tools")
    @classmethod
    def _not_implemented(cls, v: Any) -> Any:
        return _unsupported(v)

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError("only the 'text' response format is supported")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> tuple[dict[str, str], ...]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        return tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                     for m in self.messages)


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (the legacy text completion API)."""

    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("echo", "suffix", "logprobs")
    @classmethod
    def _not_implemented(cls, v: Any) -> Any:
        return _unsupported(v)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported (a string or a list of one string)")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _text_inputs(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
            raise ValueError("only text inputs are supported (a string or a list of strings), not token arrays")
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse_request(model: type[_Request], body: Any) -> Any:
    """Validate a JSON body; a problem is a 400 naming the first offending field as ``param``."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("str", "list[str]", "function-after"))]
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        missing = err["type"] == "missing"
        text = f"Missing required parameter: '{param}'." if missing else f"Invalid value for '{param}': {msg}"
        raise OpenAIError(400, text, param=param, code="missing_required_parameter" if missing else "invalid_value"
                          ) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int,
                  completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason or "stop"}],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               *, with_usage: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion_response(rid: str, model: str, text: str, finish_reason: str | None, prompt_tokens: int,
                        completion_tokens: int, created: int | None = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason or "stop"}],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     *, with_usage: bool = False) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def sse(payload: dict[str, Any] | str) -> str:
    """One Server-Sent Event: ``data: <json>`` and a blank line (``data: [DONE]`` for the end)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
