"""The response state and one request's exchange with the client, with ASGI fakes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from shoal.exceptions import BackPressureError, ReplicaDiedError
from shoal.runtime.http.exchange import Exchange
from shoal.runtime.http.response import DISCONNECT, TIMEOUT, ResponseState
from shoal.runtime.wire import RequestMeta

Send = Callable[[dict[str, Any]], Awaitable[None]]
START = {"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]}
PART = {"type": "http.response.body", "body": b"a", "more_body": True}
LAST = {"type": "http.response.body", "body": b"b", "more_body": False}


class Client:
    """An ASGI client: records what it is sent; can fail sending (gone) and never sends more."""

    def __init__(self, fail_after: int = -1) -> None:
        self.sent: list[dict[str, Any]] = []
        self.fail_after = fail_after

    async def send(self, message: dict[str, Any]) -> None:
        if len(self.sent) == self.fail_after:
            raise OSError("connection reset")
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await asyncio.get_running_loop().create_future()  # nothing more until cancelled
        raise AssertionError("unreachable")

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def json(self) -> Any:
        return json.loads(self.sent[-1]["body"])


class Access:
    def __init__(self) -> None:
        self.lines: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> None:
        self.lines.append(args)


def exchange(client: Client, access: Access, timeout: float | None = None) -> Exchange:
    meta = RequestMeta(request_id="rid", http=True, route="/p")
    return Exchange(meta, {"method": "GET", "path": "/p/x"}, client.receive, client.send, timeout, access,
                    clock=lambda: 7.0)


async def test_state_notes_messages_and_adds_the_request_id() -> None:
    client = Client()
    state = ResponseState("rid", client.send)
    await state.send(START)
    assert (state.started, state.status, state.complete) == (True, 201, False)
    assert client.sent[0]["headers"] == [(b"content-type", b"text/plain"), (b"x-request-id", b"rid")]
    own = {"type": "http.response.start", "status": 200, "headers": [(b"X-Request-ID", b"app's")]}
    await state.send(own)
    assert client.sent[1] is own
    await state.send(PART)
    assert not state.complete
    await state.send(LAST)
    assert state.complete and not state.gone


async def test_state_marks_the_client_gone_when_sending_fails() -> None:
    state = ResponseState("rid", Client(fail_after=0).send)
    with pytest.raises(OSError):
        await state.send(START)
    assert state.gone and state.started


def test_state_cancels_only_while_running() -> None:
    state = ResponseState("rid", Client().send)
    assert state.cancel(TIMEOUT) and state.why == TIMEOUT
    state.finished = True
    assert not state.cancel(DISCONNECT) and state.why == TIMEOUT


async def test_a_response_streams_through() -> None:
    client, access = Client(), Access()

    async def run(out: Send) -> None:
        for m in (START, PART, LAST):
            await out(m)

    assert await exchange(client, access).run(run) == 201
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert access.lines == []  # the application's replica logs its own requests


async def test_an_error_before_the_response_is_answered_here() -> None:
    client, access = Client(), Access()

    async def run(out: Send) -> None:
        raise BackPressureError(3, 3)

    assert await exchange(client, access).run(run) == 503
    assert client.status == 503
    assert (b"retry-after", b"1") in client.sent[0]["headers"]
    assert client.json == {"error": "service overloaded: too many queued requests", "request_id": "rid",
                           "message": "Request dropped due to backpressure (num_queued_requests=3, "
                                      "max_queued_requests=3)."}
    assert access.lines == [("GET", "/p/x", 503, 7.0, "rid", "/p")]


async def test_a_dead_replica_is_a_logged_500() -> None:
    client, access = Client(), Access()

    async def run(out: Send) -> None:
        raise ReplicaDiedError("replica-1")

    assert await exchange(client, access).run(run) == 500
    assert client.json["error"] == "the replica handling the request died"
    assert [line[2] for line in access.lines] == [500]


async def test_an_error_after_the_response_started_propagates(caplog: pytest.LogCaptureFixture) -> None:
    client, access = Client(), Access()

    async def run(out: Send) -> None:
        await out(START)
        raise RuntimeError("mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        await exchange(client, access).run(run)
    assert len(client.sent) == 1


async def test_an_error_after_the_whole_response_keeps_its_status(caplog: pytest.LogCaptureFixture) -> None:
    client, access = Client(), Access()

    async def run(out: Send) -> None:
        await out(START)
        await out(LAST)
        raise RuntimeError("after the end")

    with caplog.at_level(logging.ERROR, "shoal.proxy"):
        assert await exchange(client, access).run(run) == 201
    assert "raised after its response was sent" in caplog.text


async def test_a_client_gone_mid_response_is_499() -> None:
    client, access = Client(fail_after=1), Access()

    async def run(out: Send) -> None:
        await out(START)
        await out(PART)

    assert await exchange(client, access).run(run) == 499
    assert access.lines == []


async def test_a_timeout_before_the_response_is_408() -> None:
    client, access = Client(), Access()
    ex = exchange(client, access, timeout=30.0)

    async def run(out: Send) -> None:
        ex.stop(TIMEOUT)  # what the timer does when it fires
        await asyncio.get_running_loop().create_future()

    assert await ex.run(run) == 408
    assert client.status == 408 and client.json == {"error": "request timed out", "request_id": "rid"}
    assert [line[2] for line in access.lines] == [408]


async def test_a_disconnect_is_499_and_answers_nothing() -> None:
    client, access = Client(), Access()
    ex = exchange(client, access)

    async def run(out: Send) -> None:
        await out(START)
        ex.stop(DISCONNECT)
        await asyncio.get_running_loop().create_future()

    assert await ex.run(run) == 499
    assert len(client.sent) == 1 and access.lines == []


async def test_a_server_shutdown_cancel_propagates() -> None:
    client, access = Client(), Access()

    async def run(out: Send) -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await exchange(client, access).run(run)
    assert client.sent == []


async def test_stop_after_the_end_does_nothing() -> None:
    client, access = Client(), Access()
    ex = exchange(client, access)

    async def run(out: Send) -> None:
        await out(START)
        await out(LAST)

    assert await ex.run(run) == 201
    ex.stop(TIMEOUT)
    assert ex.state.why == ""
