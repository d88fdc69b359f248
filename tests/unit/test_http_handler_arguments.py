"""An HTTP handler that takes no argument is called without the request, as Ray Serve does;
one that takes the request (positionally, or as *args) gets it."""

from __future__ import annotations

from typing import Any

import pytest

from shoal import serve, testing
from shoal.runtime.callable import takes_an_argument


@serve.deployment
class NoArgs:
    def __call__(self) -> str:
        return "no arguments"


@serve.deployment
class AsyncNoArgs:
    async def __call__(self) -> dict[str, str]:
        return {"kind": "async, no arguments"}


@serve.deployment
class Streams:
    def __call__(self) -> Any:
        yield "a"
        yield "b"


@serve.deployment
def hello() -> str:
    return "hello from a function"


@serve.deployment
class TakesRequest:
    async def __call__(self, request: Any) -> str:
        return request.url.path


@serve.deployment
class TakesStar:
    def __call__(self, *args: Any) -> str:
        return f"{len(args)} argument(s)"


@pytest.mark.parametrize(("app", "body"), [
    (NoArgs.bind(), "no arguments"),
    (AsyncNoArgs.bind(), '{"kind":"async, no arguments"}'),
    (Streams.bind(), "ab"),
    (hello.bind(), "hello from a function"),
    (TakesRequest.bind(), "/x"),
    (TakesStar.bind(), "1 argument(s)"),
])
def test_handlers_get_the_request_only_when_they_take_one(app: serve.Application, body: str) -> None:
    with testing.run(app) as rt:
        r = rt.http("GET", "/x")
        assert r.status_code == 200, r.text
        assert r.text.replace(" ", "") == body.replace(" ", "")


def test_takes_an_argument_reads_signatures() -> None:
    class C:
        def none(self) -> None: ...
        def one(self, request: Any) -> None: ...
        def keyword_only(self, *, request: Any = None) -> None: ...

    c = C()
    assert not takes_an_argument(c.none)
    assert takes_an_argument(c.one)
    assert not takes_an_argument(c.keyword_only)
    assert takes_an_argument(print)  # *args


# -- return values, encoded as FastAPI's jsonable_encoder does ---------------------------------

@serve.deployment
class Returns:
    async def __call__(self, request: Any) -> Any:
        import dataclasses
        import datetime
        import decimal
        import enum
        import uuid

        class Color(enum.Enum):
            RED = "red"

        @dataclasses.dataclass
        class Point:
            x: int
            y: int

        kind = request.query_params["kind"]
        values: dict[str, Any] = {
            "query": request.query_params,
            "dataclass": Point(1, 2),
            "enum": Color.RED,
            "date": datetime.date(2026, 12, 3),
            "decimal": decimal.Decimal("1.5"),
            "uuid": uuid.UUID(int=1),
            "set": {3},
        }
        if kind == "coroutine":
            async def later() -> int:
                return 1

            return later()
        if kind == "opaque":
            return object()
        return values[kind]


@pytest.mark.parametrize(("kind", "want"), [
    ("query", {"kind": "query", "a": "b"}),
    ("dataclass", {"x": 1, "y": 2}),
    ("enum", "red"),
    ("date", "2026-12-03"),
    ("decimal", 1.5),
    ("uuid", "00000000-0000-0000-0000-000000000001"),
    ("set", [3]),
])
def test_return_values_are_encoded_as_fastapi_does(kind: str, want: Any) -> None:
    with testing.run(Returns.bind()) as rt:
        r = rt.http("GET", f"/?kind={kind}&a=b")
        assert r.status_code == 200, r.text
        assert r.json() == want


@pytest.mark.parametrize("kind", ["coroutine", "opaque"])
def test_a_value_with_no_json_form_is_a_500_not_its_repr(kind: str) -> None:
    with testing.run(Returns.bind()) as rt:
        r = rt.http("GET", f"/?kind={kind}")
        assert r.status_code == 500, r.text
        assert "object at 0x" not in r.text


# -- @serve.ingress(factory): each replica builds its own ASGI app -----------------------------

BUILT: list[int] = []


def make_api() -> Any:
    from fastapi import FastAPI

    api = FastAPI()
    BUILT.append(1)

    @api.get("/hi")
    async def hi() -> dict[str, str]:
        return {"from": "the factory's app"}

    return api


@serve.deployment
@serve.ingress(make_api)
class FromFactory:
    pass


def test_ingress_with_an_app_factory() -> None:
    BUILT.clear()
    with testing.run(FromFactory.bind()) as rt:
        r = rt.http("GET", "/hi")
        assert r.status_code == 200, r.text
        assert r.json() == {"from": "the factory's app"}
    assert BUILT == [1]  # built by the replica, once


def test_an_asgi_app_is_not_taken_for_a_factory() -> None:
    from shoal.runtime.callable import is_app_factory

    async def asgi(scope: Any, receive: Any, send: Any) -> None: ...

    assert is_app_factory(make_api) and not is_app_factory(asgi)
    assert not is_app_factory(make_api())  # a FastAPI instance
