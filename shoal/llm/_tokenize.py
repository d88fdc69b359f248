"""The gateway's ``/tokenize``, ``/detokenize`` and ``/health``, as vLLM's OpenAI-compatible
server has them (next to ``/v1``, not under it).

* ``POST /tokenize`` ``{"model", "prompt"}`` or ``{"model", "messages"}`` (rendered with the
  model's chat template, as a chat completion would be) → ``{"count", "max_model_len", "tokens"}``.
* ``POST /detokenize`` ``{"model", "tokens": [ids]}`` → ``{"prompt"}``; an id the tokenizer
  does not know is a 400.
* ``GET /health`` → ``200`` with an empty body while every model deployment answers, else
  ``503`` naming those that do not (each asked with a short deadline).

They need the same API key as the rest, and a tenant only reaches the models it may use.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Self

from pydantic import Field, model_validator
from starlette.responses import JSONResponse, Response

from shoal.llm._protocol import ChatMessage, OpenAIError, _Request, parse_request

# The gateway (shoal.llm._gateway.OpenAiIngress), typed loosely: it imports this module.
OpenAiIngress = Any

__all__ = ["DetokenizeRequest", "TokenizeRequest", "detokenize", "health", "tokenize"]

HEALTH_TIMEOUT_S = 3.0
CALL_TIMEOUT_S = 30.0  # a /tokenize or /detokenize call to the model server (a scaled-to-zero one wakes meanwhile)
MAX_TOKEN_IDS = 1_000_000


class TokenizeRequest(_Request):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # accepted: chat templates end with the assistant's cue

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(_Request):
    model: str
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_TOKEN_IDS)]


async def _call(gateway: OpenAiIngress, model: str, tenant: str, method: str, param: str, **kwargs: Any) -> Any:
    handle, multiplexed_id = gateway._route_llm(model, tenant)
    target = handle.options(multiplexed_model_id=multiplexed_id) if multiplexed_id else handle
    try:
        return await asyncio.wait_for(_await(getattr(target, method).remote(**kwargs)), CALL_TIMEOUT_S)
    except TimeoutError:
        raise OpenAIError(503, f"The model `{model}` did not answer {method} within {CALL_TIMEOUT_S:g}s.",
                          type="server_error", code="timeout", headers={"retry-after": "1"}) from None
    except Exception as e:
        raise gateway._downstream_error(e, param) from None


async def _await(response: Any) -> Any:
    return await response


async def tokenize(gateway: OpenAiIngress, body: Any, tenant: str) -> Response:
    req: TokenizeRequest = parse_request(TokenizeRequest, body)
    messages = None
    if req.messages is not None:
        try:
            messages = tuple({"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                             for m in req.messages)
        except ValueError as e:
            raise OpenAIError(400, f"Invalid value for 'messages': {e}", param="messages") from None
    out = await _call(gateway, req.model, tenant, "tokenize", "messages" if messages else "prompt",
                      prompt=req.prompt, messages=messages)
    return JSONResponse(out)


async def detokenize(gateway: OpenAiIngress, body: Any, tenant: str) -> Response:
    req: DetokenizeRequest = parse_request(DetokenizeRequest, body)
    return JSONResponse(await _call(gateway, req.model, tenant, "detokenize", "tokens", tokens=req.tokens))


async def health(gateway: OpenAiIngress) -> Response:
    handles = {**gateway.llms, **gateway.embedders}

    async def one(model_id: str) -> str | None:
        try:
            await asyncio.wait_for(_await(handles[model_id].model_info.remote()), HEALTH_TIMEOUT_S)
            return None
        except Exception as e:
            return f"{model_id}: {type(e).__name__}"

    failing = [f for f in await asyncio.gather(*(one(m) for m in handles)) if f]
    if failing:
        return JSONResponse(OpenAIError(503, "Not every model answers: " + "; ".join(failing),
                                        type="service_unavailable").body(), status_code=503)
    return Response(status_code=200)
