"""The limit: a raw ASGI app on plain uvicorn, no framework, no proxy, no second process.

    uvicorn benchmarks.apps.bare_asgi:app --host 127.0.0.1 --port 8000 --no-access-log

``/`` answers "ok" (echo), ``/payload`` reads the body and answers its length, ``/stream``
sends ``n`` 8-byte tokens 10 ms apart: the same contracts as the echo, payload and stream apps.
"""

import asyncio
from typing import Any

TOKEN_GAP_S = 0.010
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path = scope["path"]
    if path == "/stream":
        query = dict(p.split("=", 1) for p in scope["query_string"].decode().split("&") if "=" in p)
        n = int(query.get("n", "1000"))
        await send({"type": "http.response.start", "status": 200, "headers": _TEXT})
        for i in range(n):
            if i:
                await asyncio.sleep(TOKEN_GAP_S)
            await send({"type": "http.response.body", "body": f"{i % 10_000_000:07d}\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    more = True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode() if path == "/payload" else b"ok"
    await send({"type": "http.response.start", "status": 200,
                "headers": [*_TEXT, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
