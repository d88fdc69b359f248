"""Errors as HTTP answers: the one exception -> status mapping, and short JSON bodies.

Tracebacks stay in the logs; clients get a status, a short message and the request id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayTaskError,
    ReplicaDiedError,
    RequestCancelledError,
)

Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

HINT = "GET /-/routes lists the route prefixes"
HEALTHY: dict[str, Any] = {"status": "success"}
_REFUSALS = {401: "unauthorized", 403: "forbidden", 413: "request body too large"}
#: Ingress deployments whose clients speak OpenAI's API (shoal.llm's gateway): a front's refusals
#: on their routes carry OpenAI's error object, ``{"error": {message, type, param, code}}``.
OPENAI_INGRESSES = frozenset({"OpenAiIngress"})
_OPENAI_REFUSALS = {413: ("Request body too large for this server.", "request_too_large")}


def error_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and short message for an exception (the only such mapping in shoal)."""
    if isinstance(exc, BackPressureError):
        return 503, "service overloaded: too many queued requests"
    if isinstance(exc, DeploymentUnavailableError):
        return 503, "service unavailable"
    if isinstance(exc, ReplicaDiedError):
        return 500, "the replica handling the request died"
    if isinstance(exc, RequestCancelledError):
        return 499, "request cancelled"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not isinstance(exc, RayTaskError):
        return 408, "request timed out"
    return 500, "internal server error"


def error_answer(exc: BaseException, request_id: str) -> tuple[int, dict[str, Any], Headers]:
    """The status, JSON body and extra headers answering a request that raised ``exc``
    before its response started (503s ask the client to retry after a second)."""
    status, text = error_status(exc)
    extra = [(b"retry-after", b"1")] if status == 503 else []
    body: dict[str, Any] = {"error": text, "request_id": request_id}
    if isinstance(exc, (DeploymentUnavailableError, BackPressureError)) and str(exc):
        # why: e.g. the deployment failed to deploy (and its error), or how long it waited
        body["message"] = str(exc)
    return status, body, extra


def not_found(path: str, hint: bool = True) -> dict[str, Any]:
    """The body of a 404 for ``path``; ``hint`` points at the route listing."""
    return {"error": "not found", "path": path, "hint": HINT} if hint else {"error": "not found", "path": path}


def refusal_text(status: int) -> str:
    """The message of a request refused before it reached an application."""
    return _REFUSALS.get(status, "internal server error" if status >= 500 else "request refused")


async def send_json(send: Send, status: int, body: dict[str, Any], request_id: str = "",
                    extra: Headers | None = None) -> None:
    """Answer with ``body`` as JSON (and ``x-request-id`` when given)."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    headers.extend(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def refusal_body(status: int, request_id: str, ingress: str = "") -> dict[str, Any]:
    """The body refusing a request routed to ``ingress`` (``""``: not routed yet)."""
    if ingress in OPENAI_INGRESSES:
        message, code = _OPENAI_REFUSALS.get(status, (refusal_text(status).capitalize() + ".", None))
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return {"error": refusal_text(status), "request_id": request_id}


async def refuse(send: Send, status: int, request_id: str, ingress: str = "") -> None:
    """Answer a request refused before it reached an application (routed to ``ingress``, when
    it was), and close the connection (the client may still be sending a body nobody will read)."""
    extra = [(b"connection", b"close")]
    if status == 401:
        extra.append((b"www-authenticate", b"Bearer"))
    await send_json(send, status, refusal_body(status, request_id, ingress), request_id, extra)
