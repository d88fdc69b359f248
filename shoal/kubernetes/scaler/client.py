"""A tiny bounded HTTP/1.1 client (one request per connection) for the scaler's paths: the scaler
scraping pods' ``/metrics``, callers posting demand to the scaler, the simulation's KEDA stand-in
reading ``/scale/<deployment>``. Every step is under one deadline and the answer under a size cap,
so that a silent or babbling peer costs a bounded wait and bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse

__all__ = ["HttpCallError", "http_call", "split_url"]

MAX_ANSWER_BYTES = 4 << 20


class HttpCallError(Exception):
    """The request could not be made or answered within its bounds (the message says which)."""


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an ``http://`` URL (ValueError naming what is wrong)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r} is not an http://host[:port]/path URL")
    return parts.hostname, parts.port or 80, parts.path or "/"


async def http_call(host: str, port: int, method: str, path: str, *, body: bytes = b"", timeout: float = 2.0,
                    max_bytes: int = MAX_ANSWER_BYTES, bearer: str | None = None) -> tuple[int, bytes]:
    """``method path`` to ``host:port``; (status, body). Raises :class:`HttpCallError` when the
    connection, the request or the whole answer takes longer than ``timeout`` seconds, the answer
    is larger than ``max_bytes`` or not HTTP. ``bearer``: a token sent as ``Authorization: Bearer``."""
    if bearer is not None and any(c in bearer for c in "\r\n"):
        raise HttpCallError("the bearer token holds a line break")
    auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            head = (f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                    f"Content-Length: {len(body)}\r\n{auth}"
                    + ("Content-Type: application/json\r\n" if body else "") + "\r\n").encode("latin-1")
            writer.write(head + body)
            await writer.drain()
            data = bytearray()
            while chunk := await reader.read(65536):
                data += chunk
                if len(data) > max_bytes:
                    raise HttpCallError(f"{method} http://{host}:{port}{path}: answer over {max_bytes} bytes")
    except TimeoutError:
        raise HttpCallError(f"{method} http://{host}:{port}{path}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise HttpCallError(f"{method} http://{host}:{port}{path}: {e}") from None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 0.5)
    return _parse(bytes(data), f"{method} http://{host}:{port}{path}")


def _parse(data: bytes, what: str) -> tuple[int, bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise HttpCallError(f"{what}: the answer is not HTTP (no complete head)")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
        raise HttpCallError(f"{what}: the answer is not HTTP ({bytes(head[:40])!r})")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            rest = rest[: int(value.strip())]
        if name.strip().lower() == b"transfer-encoding":
            raise HttpCallError(f"{what}: chunked answers are not supported")
    return int(status_line[1]), rest
