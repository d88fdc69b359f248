"""The scaler's HTTP server: small, asyncio, one request per connection, every client bounded.

One deadline for the request head and body (``head_timeout_s``, then 408), a cap on the head
(431) and on the body (413), a cap on connections served at once (beyond it 503 and the
connection closed), a strict request line (400), JSON answers with ``Connection: close``. The
routes are the :data:`Handler` given (see :mod:`shoal.kubernetes.scaler.service`); this module
only speaks HTTP.

With a ``token`` (``shoal k8s scaler --auth bearer``), every path but the probes
(:data:`OPEN_PATHS`) needs ``Authorization: Bearer <token>``; anything else is answered 401 with
``WWW-Authenticate: Bearer`` before the handler runs. The token is compared in constant time (the
SHA-256 digests of both, with :func:`hmac.compare_digest`, so not even its length leaks).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OPEN_PATHS", "Handler", "ScalerServer", "ServerLimits", "token_matches"]

logger = logging.getLogger("shoal.scaler")

# (method, path with its %-escapes decoded, body) -> (status, JSON body)
Handler = Callable[[str, str, bytes], tuple[int, dict[str, Any]]]

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.[01]")
# The kubelet's probes: no credentials (httpGet probes carry no Secret), no data beyond ok/ready.
OPEN_PATHS = frozenset({"/-/healthz", "/-/ready"})
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed",
            408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class ServerLimits:
    head_timeout_s: float = 5.0
    max_head_bytes: int = 8192
    max_body_bytes: int = 4096
    max_connections: int = 64


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_matches(authorization: bytes | None, token: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``, compared in constant time."""
    if authorization is None:
        return False
    scheme, _, given = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(hashlib.sha256(given.strip()).digest(), hashlib.sha256(token).digest())


class ScalerServer:
    """Serves ``handler`` on ``host:port`` (see the module docstring); ``token``: the bearer token
    every path but :data:`OPEN_PATHS` requires (None: none required)."""

    def __init__(self, handler: Handler, limits: ServerLimits | None = None, *, token: str | None = None) -> None:
        if token is not None and not token.strip():
            raise ValueError("the scaler's bearer token is empty")
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.token = token.strip().encode() if token is not None else None
        self.connections = 0
        self.refused = 0
        self.unauthorized = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen (OSError when the port cannot be bound)."""
        self._server = await asyncio.start_server(self._client, host, port, reuse_address=True,
                                                  limit=self.limits.max_head_bytes)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limits.max_connections:
            self.refused += 1
            writer.write(_response(503, {"error": "scaler busy: too many connections"}))
            writer.close()
            return
        self.connections += 1
        try:
            try:
                async with asyncio.timeout(self.limits.head_timeout_s):
                    method, path, body, authorization = await self._read(reader)
                if self.token is not None and path not in OPEN_PATHS and not token_matches(authorization, self.token):
                    self.unauthorized += 1
                    raise _Refused(401, "unauthorized: send Authorization: Bearer <token> (the Secret of "
                                        "--scaler-auth bearer)")
                status, answer = self._call(method, path, body)
            except TimeoutError:
                status, answer = 408, {"error": "request not received in time"}
            except _Refused as e:
                status, answer = e.status, {"error": str(e)}
            writer.write(_response(status, answer, [("WWW-Authenticate", "Bearer")] if status == 401 else []))
            await asyncio.wait_for(writer.drain(), self.limits.head_timeout_s)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    def _call(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            return self.handler(method, path, body)
        except Exception:
            logger.exception("scaler request %s %s failed", method, path)
            return 500, {"error": "internal error"}

    async def _read(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes, bytes | None]:
        limits = self.limits
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Refused(431, f"request head over {limits.max_head_bytes} bytes") from None
        except asyncio.IncompleteReadError:
            raise _Refused(400, "incomplete request") from None
        if len(head) > limits.max_head_bytes:
            raise _Refused(431, f"request head over {limits.max_head_bytes} bytes")
        lines = head[:-4].split(b"\r\n")
        request = _REQUEST_LINE.fullmatch(lines[0])
        if request is None:
            raise _Refused(400, "bad request line")
        length = 0
        authorization: bytes | None = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _Refused(400, "bad header line")
            key = name.strip().lower()
            if key == b"transfer-encoding":
                raise _Refused(400, "chunked bodies are not accepted: send Content-Length")
            if key == b"content-length":
                if not value.strip().isdigit():
                    raise _Refused(400, "bad Content-Length")
                length = int(value.strip())
            if key == b"authorization":
                if authorization is not None:
                    raise _Refused(400, "more than one Authorization header")
                authorization = value.strip()
        if length > limits.max_body_bytes:
            raise _Refused(413, f"body over {limits.max_body_bytes} bytes")
        try:
            body = await reader.readexactly(length) if length else b""
        except asyncio.IncompleteReadError:
            raise _Refused(400, "incomplete body") from None
        method = request.group(1).decode("ascii")
        path = urllib.parse.unquote(request.group(2).decode("ascii").split("?", 1)[0])
        return method, path, body, authorization


def _response(status: int, body: dict[str, Any], headers: list[tuple[str, str]] | None = None) -> bytes:
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers or ())
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{extra}Connection: close\r\n\r\n").encode("latin-1")
    return head + payload
