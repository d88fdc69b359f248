"""HTTP through the proxy process to replica processes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import Instance
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from shoal import serve
from shoal.handle import DeploymentHandle


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> object:
        kind = request.query_params.get("kind", "json")
        if kind == "text":
            return "plain text"
        if kind == "bytes":
            return b"\x00\x01raw"
        if kind == "response":
            return PlainTextResponse("teapot", status_code=418, headers={"x-custom": "yes"})
        if kind == "error":
            raise RuntimeError("secret internal detail")
        if kind == "sleep":
            await asyncio.sleep(float(request.query_params["s"]))
            return "slept"
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "root_path": request.scope.get("root_path"),
            "query": dict(request.query_params),
            "body": body.decode(),
            "request_id": request.headers.get("x-request-id"),
        }


@serve.deployment
def other(request: Request) -> dict[str, str]:
    return {"app": "other", "path": request.url.path}


def test_return_value_conversion(instance: Instance) -> None:
    serve.run(Echo.bind())
    with httpx.Client(base_url=instance.url) as c:
        r = c.get("/", params={"kind": "text"})
        assert r.status_code == 200 and r.text == "plain text"
        assert r.headers["content-type"].startswith("text/plain")
        r = c.get("/", params={"kind": "bytes"})
        assert r.content == b"\x00\x01raw"
        r = c.get("/", params={"kind": "response"})
        assert r.status_code == 418 and r.text == "teapot" and r.headers["x-custom"] == "yes"
        r = c.post("/some/path", params={"a": "1"}, content=b"payload")
        assert r.status_code == 200
        data = r.json()
        assert data["method"] == "POST" and data["path"] == "/some/path"
        assert data["query"] == {"a": "1"}
        assert data["body"] == "payload"


def test_request_id_in_and_out(instance: Instance) -> None:
    serve.run(Echo.bind())
    with httpx.Client(base_url=instance.url) as c:
        r = c.get("/", headers={"x-request-id": "my-id-123"})
        assert r.headers["x-request-id"] == "my-id-123"
        assert r.json()["request_id"] == "my-id-123"
        r = c.get("/")
        assert len(r.headers["x-request-id"]) >= 8
        assert r.json()["request_id"] == r.headers["x-request-id"]


def test_user_error_is_500_json_without_traceback(instance: Instance) -> None:
    serve.run(Echo.bind())
    r = httpx.get(instance.url + "/", params={"kind": "error"})
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal server error"
    assert body["request_id"] == r.headers["x-request-id"]
    assert "secret internal detail" not in r.text and "Traceback" not in r.text
    # The replica survives.
    assert httpx.get(instance.url + "/", params={"kind": "text"}).text == "plain text"


def test_routes_longest_prefix_and_404(instance: Instance) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/api")
    serve.run(other.bind(), name="other", route_prefix="/api/v2")
    with httpx.Client(base_url=instance.url) as c:
        assert c.get("/api/v2/x").json() == {"app": "other", "path": "/api/v2/x"}
        data = c.get("/api/v1").json()
        assert data["path"] == "/api/v1" and data["root_path"] == "/api"
        assert c.get("/api").status_code == 200
        r = c.get("/apix")  # a prefix matches whole path segments only
        assert r.status_code == 404 and r.json()["error"] == "not found"
        assert c.get("/nothing/here").status_code == 404
        assert c.get("/-/routes").json() == {"/api": "echo", "/api/v2": "other"}
        assert c.get("/-/healthz").status_code == 200
    serve.delete("other")
    assert httpx.get(instance.url + "/-/routes").json() == {"/api": "echo"}
    # /api/v2 now falls back to the /api app.
    assert httpx.get(instance.url + "/api/v2/x").json()["path"] == "/api/v2/x"


def test_no_route_prefix_means_no_http(instance: Instance) -> None:
    serve.run(other.bind(), name="internal", route_prefix=None)
    assert httpx.get(instance.url + "/-/routes").json() == {}
    assert httpx.get(instance.url + "/").status_code == 404
    assert serve.status().applications["internal"].route_prefix is None


def test_fastapi_ingress(instance: Instance) -> None:
    api = FastAPI()

    @serve.deployment
    class Doubler:
        def double(self, x: int) -> int:
            return 2 * x

    @serve.deployment
    @serve.ingress(api)
    class Service:
        def __init__(self, doubler: DeploymentHandle) -> None:
            self.doubler = doubler
            self.greeting = "hello"

        @api.get("/hello")
        def hello(self, name: str) -> str:
            return f"{self.greeting} {name}"

        @api.post("/double/{x}")
        async def double(self, x: int) -> dict[str, int]:
            return {"result": await self.doubler.double.remote(x)}

    serve.run(Service.bind(Doubler.bind()), route_prefix="/svc")
    with httpx.Client(base_url=instance.url) as c:
        assert c.get("/svc/hello", params={"name": "shoal"}).json() == "hello shoal"
        assert c.post("/svc/double/21").json() == {"result": 42}
        assert c.get("/svc/double/21").status_code == 405
        assert c.get("/svc/hello").status_code == 422  # FastAPI validation, passed through
        assert c.get("/svc/openapi.json").status_code == 200


def test_streaming_response_chunk_by_chunk(instance: Instance) -> None:
    @serve.deployment
    class SSE:
        def __init__(self) -> None:
            self.go = asyncio.Event()

        async def release(self) -> None:
            self.go.set()

        async def __call__(self, request: Request) -> StreamingResponse:
            async def events():  # type: ignore[no-untyped-def]
                yield "data: 0\n\n"
                await self.go.wait()  # the rest only after the client has seen the first event
                for i in range(1, 5):
                    yield f"data: {i}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    h = serve.run(SSE.bind())
    with httpx.stream("GET", instance.url + "/", timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "data: 0"  # delivered before the generator went on
        h.release.remote().result()
        rest = [x for x in lines if x]
    assert rest == [f"data: {i}" for i in range(1, 5)]


def test_generator_call_streams(instance: Instance) -> None:
    @serve.deployment
    class Gen:
        def __call__(self, request: Request):  # type: ignore[no-untyped-def]
            for i in range(3):
                yield f"{i},"

    serve.run(Gen.bind())
    assert httpx.get(instance.url + "/").text == "0,1,2,"


def test_json_response_and_status(instance: Instance) -> None:
    @serve.deployment
    class Created:
        def __call__(self, request: Request) -> JSONResponse:
            return JSONResponse({"ok": True}, status_code=201)

    serve.run(Created.bind())
    r = httpx.post(instance.url + "/")
    assert r.status_code == 201 and r.json() == {"ok": True}


def test_large_body_round_trip(instance: Instance) -> None:
    @serve.deployment
    class Size:
        async def __call__(self, request: Request) -> dict[str, int]:
            return {"size": len(await request.body())}

    serve.run(Size.bind())
    payload = b"x" * (3 * 1024 * 1024)
    assert httpx.post(instance.url + "/", content=payload, timeout=30).json() == {"size": len(payload)}


@pytest.mark.parametrize("timeout", [0.5])
def test_request_timeout(run_dir: str, timeout: float) -> None:
    serve.start(http_options={"port": 0, "request_timeout_s": timeout}, _run_dir=run_dir)
    try:
        serve.run(Echo.bind())
        url = serve.http_address()
        r = httpx.get(url + "/", params={"kind": "sleep", "s": "10"}, timeout=20)
        assert r.status_code == 408
        assert json.loads(r.text)["error"] == "request timed out"
        assert httpx.get(url + "/", params={"kind": "sleep", "s": "0"}).text == "slept"
    finally:
        serve.shutdown()
