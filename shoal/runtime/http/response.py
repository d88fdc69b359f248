"""The state of one response on its way to the client.

It replaces flags that the forwarding code used to share through closures: whether the
response started (its status is then fixed), whether its last body message went out, whether
sending failed (the client went away), whether the request is over, and why it was cancelled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]

# Why a front cancelled a request.
TIMEOUT = "timeout"
DISCONNECT = "disconnect"


@dataclass(slots=True)
class ResponseState:
    """What is known of a response while it streams to the client through :meth:`send`."""

    request_id: str
    client_send: Send  # the client's ASGI send
    status: int = 500  # the response's status once started; the one the request is recorded with
    started: bool = False  # http.response.start went out: the status can no longer change
    complete: bool = False  # the last body message went out
    gone: bool = False  # sending to the client failed: it went away mid-response
    finished: bool = False  # the request is over; late timers and watchers do nothing
    why: str = ""  # TIMEOUT or DISCONNECT when the front cancelled the request

    async def send(self, message: dict[str, Any]) -> None:
        """Send ``message`` to the client, noting it; a response start gets ``x-request-id``
        unless the application set one. A failing send marks the client gone."""
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started = True
            headers = message.get("headers", ())
            if not any(k.lower() == b"x-request-id" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"x-request-id", self.request_id.encode())]}
        elif not message.get("more_body", False):
            self.complete = True
        try:
            await self.client_send(message)
        except Exception:
            self.gone = True
            raise

    def cancel(self, why: str) -> bool:
        """Whether a request still running should be cancelled for ``why`` (noted)."""
        if self.finished:
            return False
        self.why = why
        return True
