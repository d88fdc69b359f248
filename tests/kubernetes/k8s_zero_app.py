"""An app whose HTTP ingress scales to zero, for the holding-front tests (test_sim_ingress_zero.py).

``Gate`` is a FastAPI ingress with ``min_replicas: 0`` and short autoscaling delays: ``GET /``
answers with its pod's name, ``GET /stream`` streams server-sent events, ``/echo`` is a WebSocket
echo. Its constructor fails while the file named by ``$ZERO_FAIL_FILE`` exists, so that a test can
make the ingress unable to start. No ``from __future__ import annotations``: FastAPI must see
``ws: WebSocket`` as the class.
"""

import asyncio
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from shoal import serve

api = FastAPI()
QUICK = {"metrics_interval_s": 0.2, "look_back_period_s": 1.0, "upscale_delay_s": 0.5,
         "downscale_delay_s": 1.0, "downscale_to_zero_delay_s": 1.0}


def _pod() -> str:
    return os.environ.get("SHOAL_POD_NAME", "?")


@serve.deployment(max_ongoing_requests=8, health_check_period_s=0.2, graceful_shutdown_timeout_s=5,
                  autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 4, **QUICK})
@serve.ingress(api)
class Gate:
    def __init__(self) -> None:
        fail = os.environ.get("ZERO_FAIL_FILE", "")
        if fail and os.path.exists(fail):
            raise RuntimeError(f"told to fail ({fail} exists)")

    @api.get("/")
    async def root(self, q: str = "") -> dict[str, str]:
        await asyncio.sleep(0.05)
        return {"q": q, "pod": _pod()}

    @api.get("/stream")
    async def stream(self, n: int = 3) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            for i in range(n):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.websocket("/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                text = await ws.receive_text()
                await ws.send_text(f"{_pod()}:{text}")
        except WebSocketDisconnect:
            pass


app = Gate.bind()
