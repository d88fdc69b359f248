"""The admit-and-account step: where a request goes, and the ledger of requests in flight."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from shoal.runtime.http.admit import Ledger, runner, serves_here
from shoal.runtime.wire import RequestMeta

Send = Callable[[dict[str, Any]], Awaitable[None]]
START = {"type": "http.response.start", "status": 200, "headers": []}


class FakeRouter:
    def __init__(self, models: tuple[str, ...] = ()) -> None:
        self.models = models
        self.calls: list[tuple[str, Any, RequestMeta]] = []

    def holds_model(self, model_id: str) -> bool:
        return model_id in self.models

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
        self.calls.append((method, args, meta))
        yield [START]
        yield [{"type": "http.response.body", "body": b"remote", "more_body": False}]


class FakeSource:
    def __init__(self, models: tuple[str, ...] = ()) -> None:
        self.routers: dict[tuple[str, str], FakeRouter] = {}
        self.models = models

    def router(self, app: str, deployment: str) -> FakeRouter:
        return self.routers.setdefault((app, deployment), FakeRouter(self.models))


class FakeLocal:
    key = ("app", "Ingress")

    def __init__(self, model_ids: tuple[str, ...] = ()) -> None:
        self.model_ids = model_ids
        self.served: list[RequestMeta] = []

    async def serve(self, scope: dict[str, Any], body: bytes, meta: RequestMeta, send: Send) -> None:
        self.served.append(meta)
        await send(START)
        await send({"type": "http.response.body", "body": b"local", "more_body": False})


def test_serves_here() -> None:
    local, source = FakeLocal(("m1",)), FakeSource(models=("m2",))
    assert not serves_here(None, source, "app", "Ingress", "")  # type: ignore[arg-type]
    assert serves_here(local, source, "app", "Ingress", "")  # type: ignore[arg-type]
    assert not serves_here(local, source, "other", "Ingress", "")  # type: ignore[arg-type]
    assert serves_here(local, source, "app", "Ingress", "m1")  # type: ignore[arg-type]
    assert not serves_here(local, source, "app", "Ingress", "m2")  # type: ignore[arg-type]  # held elsewhere
    assert serves_here(local, source, "app", "Ingress", "m3")  # type: ignore[arg-type]  # held nowhere: load it here


async def collect(run: Callable[[Send], Awaitable[None]]) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    async def send(m: dict[str, Any]) -> None:
        got.append(m)

    await run(send)
    return got


async def test_runner_goes_to_the_local_ingress_or_the_router() -> None:
    local, source = FakeLocal(), FakeSource()
    meta = RequestMeta(request_id="r", http=True)
    here = await collect(runner(local, source, "app", "Ingress", {}, b"", meta))  # type: ignore[arg-type]
    assert here[-1]["body"] == b"local" and local.served == [meta]
    there = await collect(runner(local, source, "app2", "Ingress", {"s": 1}, b"body", meta))  # type: ignore[arg-type]
    assert there[-1]["body"] == b"remote"
    assert source.routers[("app2", "Ingress")].calls == [("__call__", ({"s": 1}, b"body"), meta)]


def test_ledger_counts_and_records() -> None:
    records: list[tuple[Any, ...]] = []
    spans: list[tuple[Any, int]] = []
    ledger = Ledger(record=lambda *a: records.append(a), end_span=lambda s, c: spans.append((s, c)),
                    clock=lambda: 5.0)
    ledger.begin()
    ledger.begin()
    assert ledger.ongoing == 2
    ledger.end(("/p", "app", "Dep"), "GET", 200, 1.0, span="span")
    ledger.end(("/p", "app", "Dep"), "POST", 503, 2.0)
    assert ledger.ongoing == 0
    ledger.refused(("", "", ""), "GET", 404, 3.0)
    assert ledger.ongoing == 0
    assert records == [("app", "Dep", "/p", "GET", 200, 1.0), ("app", "Dep", "/p", "POST", 503, 2.0),
                       ("", "", "", "GET", 404, 3.0)]
    assert spans == [("span", 200)]
