"""A FastAPI ingress with a WebSocket echo route, for the pod WebSocket test.

No ``from __future__ import annotations``: FastAPI must see ``ws: WebSocket`` as the class.
"""

import os

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from shoal import serve

api = FastAPI()


@serve.deployment(max_ongoing_requests=4, graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class WsEcho:
    @api.websocket("/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                text = await ws.receive_text()
                await ws.send_text(f"{os.environ.get('SHOAL_POD_NAME', '?')}:{text}")
        except WebSocketDisconnect:
            pass


app = WsEcho.bind()
