"""ProxyApp, the composed request path, driven with ASGI fakes (no sockets, no processes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from shoal.runtime.http.app import ProxyApp
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.wire import RequestMeta, Routes


class FakeRouter:
    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[tuple[dict[str, Any], bytes, RequestMeta]] = []

    def holds_model(self, model_id: str) -> bool:
        return False

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
        scope, body = args
        self.requests.append((scope, body, meta))
        yield [{"type": "http.response.start", "status": 200, "headers": []},
               {"type": "http.response.body", "body": self.name.encode(), "more_body": False}]


class FakeSource:
    def __init__(self) -> None:
        self.routers: dict[tuple[str, str], FakeRouter] = {}

    def router(self, app: str, deployment: str) -> FakeRouter:
        return self.routers.setdefault((app, deployment), FakeRouter(app))


class Call:
    """One ASGI call: the scope, a body in one message, what came back."""

    def __init__(self, path: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
                 method: str = "POST") -> None:
        self.scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "headers": headers or [],
                                      "query_string": b""}
        self.body = body
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def on(self, app: ProxyApp) -> Call:
        await app(self.scope, self.receive, self.send)
        return self

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def content(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


def front(options: FrontOptions | None = None, split: dict[str, tuple[str, str, float]] | None = None
          ) -> tuple[ProxyApp, FakeSource]:
    source = FakeSource()
    app = ProxyApp(source, options or FrontOptions())  # type: ignore[arg-type]
    app.set_routes(Routes({"/": ("root", "R"), "/api": ("api", "A")}, split=split or {}))
    return app, source


async def test_set_routes_subscribes_to_every_target() -> None:
    _, source = front(split={"/api": ("api2", "A2", 0.0)})
    assert set(source.routers) == {("root", "R"), ("api", "A"), ("api2", "A2")}


async def test_a_request_reaches_its_route_with_an_id_and_a_root_path() -> None:
    app, source = front(FrontOptions(root_path="/base"))
    call = await Call("/base/api/x", b"hi").on(app)
    assert (call.status, call.content) == (200, b"api")
    scope, body, meta = source.routers[("api", "A")].requests[0]
    assert body == b"hi" and scope["root_path"] == "/base/api"
    rid = call.headers[b"x-request-id"]
    assert (b"x-request-id", rid) in scope["headers"]
    assert meta == RequestMeta(request_id=rid.decode(), http=True, route="/api")
    assert app.ongoing == 0
    outside = await Call("/elsewhere").on(app)
    assert outside.status == 404 and json.loads(outside.content) == {"error": "not found", "path": "/elsewhere"}


async def test_front_answers() -> None:
    app, _ = front()
    health = await Call("/-/healthz", headers=[(b"x-request-id", b"r1")]).on(app)
    assert (health.status, json.loads(health.content)) == (200, {"status": "success"})
    assert health.headers[b"x-request-id"] == b"r1"
    routes = await Call("/-/routes").on(app)
    assert json.loads(routes.content) == {"/api": "api", "/": "root"}


async def test_no_route_is_404_with_a_hint() -> None:
    source = FakeSource()
    app = ProxyApp(source, FrontOptions())  # type: ignore[arg-type]
    app.set_routes(Routes({"/api": ("api", "A")}))
    call = await Call("/nope").on(app)
    assert call.status == 404
    assert json.loads(call.content)["hint"] == "GET /-/routes lists the route prefixes"


async def test_canary_split_by_weight() -> None:
    app, _ = front(split={"/api": ("api2", "A2", 100.0)})
    assert (await Call("/api").on(app)).content == b"api2"
    assert (await Call("/").on(app)).content == b"root"
    app, _ = front(split={"/api": ("api2", "A2", 0.0)})
    assert (await Call("/api").on(app)).content == b"api"


async def test_body_limits_and_credentials() -> None:
    app, source = front(FrontOptions(max_request_body_bytes=4))
    declared = await Call("/", b"", headers=[(b"content-length", b"5")]).on(app)
    assert declared.status == 413 and declared.headers[b"connection"] == b"close"
    sent = await Call("/", b"12345").on(app)
    assert sent.status == 413
    assert source.routers[("root", "R")].requests == []
    app, _ = front(FrontOptions(api_keys=("k" * 16,)))
    denied = await Call("/").on(app)
    assert denied.status == 401 and denied.headers[b"www-authenticate"] == b"Bearer"
    assert (await Call("/-/healthz").on(app)).status == 200  # health needs no credentials


async def test_lifespan_and_websocket() -> None:
    app, _ = front()
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(m: dict[str, Any]) -> None:
        out.append(m)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in out] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    # WebSockets (shoal.runtime.http.websocket; tests/unit/test_http_websocket.py): a client gone
    # before the handshake gets nothing; one without credentials is refused with a reason (a
    # close, when the server offers no websocket.http.response extension).
    out.clear()
    inbox[:] = [{"type": "websocket.disconnect", "code": 1006}]
    await app({"type": "websocket", "path": "/", "headers": []}, receive, send)
    assert out == []
    app, _ = front(FrontOptions(api_keys=("k" * 16,)))
    inbox[:] = [{"type": "websocket.connect"}]
    await app({"type": "websocket", "path": "/", "headers": []}, receive, send)
    assert out == [{"type": "websocket.close", "code": 1008, "reason": "unauthorized"}]
