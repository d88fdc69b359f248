"""The HTTP front's guards in one process: limits, API keys, the auth hook, TLS settings.

A ProxyApp with a fake router runs under a real HTTPFront (uvicorn on a 127.0.0.1 socket), so
that what the client sees is what a shoal front answers, without starting replicas.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from shoal.config import HTTPOptions
from shoal.runtime.httpguard import Authenticator, exposure_warning, is_loopback, presented_key, ssl_config
from shoal.runtime.proxy import FrontOptions, HTTPFront, ProxyApp
from shoal.runtime.wire import RequestMeta, Routes

KEY = "k" * 12 + "-test-key-1"
OTHER_KEY = "o" * 12 + "-test-key-2"


class FakeRouter:
    """Answers every request with the size of its body, and remembers what it was sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def holds_model(self, model_id: str) -> bool:
        return False

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
        _scope, body = args
        self.bodies.append(body)
        yield [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]},
               {"type": "http.response.body", "body": b"got %d" % len(body), "more_body": False}]


class FakeSource:
    def __init__(self) -> None:
        self.routers: dict[tuple[str, str], FakeRouter] = {}

    def router(self, app: str, deployment: str) -> FakeRouter:
        return self.routers.setdefault((app, deployment), FakeRouter())


class Front:
    def __init__(self, options: FrontOptions) -> None:
        self.source = FakeSource()
        self.app = ProxyApp(self.source, options)  # type: ignore[arg-type]
        self.app.set_routes(Routes({"/": ("app", "Ingress")}))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.front = HTTPFront(self.app, self.sock.fileno(), options)

    @property
    def forwarded(self) -> list[bytes]:
        return self.source.router("app", "Ingress").bodies

    async def __aenter__(self) -> Front:
        await self.front.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.front.stop(2)
        self.sock.close()


async def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                return out
            out += chunk
    finally:
        writer.close()


# ---- limits --------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_and_never_forwarded() -> None:
    async with Front(FrontOptions(max_request_body_bytes=1000)) as f, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{f.port}") as c:
        assert (await c.post("/", content=b"x" * 1000)).text == "got 1000"
        r = await c.post("/", content=b"x" * 1001)
        assert r.status_code == 413
        assert r.json() == {"error": "request body too large", "request_id": r.headers["x-request-id"]}
        assert r.headers["connection"] == "close"

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: the body grows past the limit
            for _ in range(4):
                yield b"y" * 400

        r = await c.post("/", content=chunks())
        assert r.status_code == 413 and r.json()["error"] == "request body too large"
        assert f.forwarded == [b"x" * 1000]


async def test_request_head_over_the_limit_is_431() -> None:
    async with Front(FrontOptions(max_header_bytes=4096)) as f:
        # A head that arrives in one read, and one that keeps coming over many reads.
        out = await raw(f.port, b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 5000 + b"\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 431 ")
        assert b'"error": "request header fields too large"' in out
        again = await raw(f.port, b"GET /" + b"u" * 5000 + b" HTTP/1.1\r\nhost: x\r\n\r\n")
        assert again.startswith(b"HTTP/1.1 431 ")
        ids = [x.split(b"x-request-id: ")[1][:16] for x in (out, again)]
        assert ids[0] != ids[1] and ids[0] in out.split(b"\r\n\r\n")[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")
        for i in range(200):
            try:
                writer.write(b"x-h%d: %s\r\n" % (i, b"b" * 100))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0)
        out = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 431 ")
        # Under the limit, with a body in the same read, is fine; the front still serves.
        ok = await raw(f.port, b"POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-h: " + b"c" * 3000
                       + b"\r\ncontent-length: 5000\r\n\r\n" + b"d" * 5000)
        assert ok.startswith(b"HTTP/1.1 200 ") and b"got 5000" in ok
        assert f.forwarded == [b"d" * 5000]


async def test_keep_alive_requests_each_get_their_own_head_budget() -> None:
    async with Front(FrontOptions(max_header_bytes=2048)) as f:
        one = b"GET / HTTP/1.1\r\nhost: x\r\nx-h: " + b"a" * 1500 + b"\r\n\r\n"
        last = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        out = await raw(f.port, one * 5 + last)
        assert out.count(b"HTTP/1.1 200 ") == 6


# ---- API keys and the auth hook -----------------------------------------------------------


def test_presented_key() -> None:
    assert presented_key([(b"authorization", b"Bearer abc")]) == b"abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == b"abc"
    assert presented_key([(b"authorization", b"Basic abc")]) is None
    assert presented_key([(b"x-api-key", b"xyz")]) == b"xyz"
    assert presented_key([(b"x-api-key", b"")]) is None
    assert presented_key([]) is None


async def test_api_keys() -> None:
    auth = Authenticator([KEY, OTHER_KEY])

    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"type": "http", "headers": list(headers)}

    assert await auth.check(scope((b"authorization", b"Bearer " + KEY.encode()))) == 0
    assert await auth.check(scope((b"x-api-key", OTHER_KEY.encode()))) == 0
    assert await auth.check(scope((b"x-api-key", KEY[:-1].encode()))) == 401
    assert await auth.check(scope((b"x-api-key", KEY.encode() + b"x"))) == 401
    assert await auth.check(scope()) == 401
    assert Authenticator.of((), "") is None


async def test_unauthenticated_requests_get_401_and_healthz_stays_open() -> None:
    async with Front(FrontOptions(api_keys=(KEY,))) as f, \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{f.port}") as c:
        for path in ("/", "/-/routes", "/anything"):
            r = await c.post(path, content=b"secret payload")
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json() == {"error": "unauthorized", "request_id": r.headers["x-request-id"]}
        assert (await c.get("/", headers={"authorization": "Bearer wrong-key-wrong-key"})).status_code == 401
        assert (await c.get("/-/healthz")).json() == {"status": "success"}
        assert (await c.post("/", content=b"abc", headers={"authorization": f"Bearer {KEY}"})).text == "got 3"
        assert (await c.post("/", content=b"abcd", headers={"x-api-key": KEY})).text == "got 4"
        assert f.forwarded == [b"abc", b"abcd"]


def allow_if_header(request: Any) -> object:
    """An auth hook: the ``x-user`` header decides."""
    user = request.headers.get("x-user")
    if user == "admin":
        return True
    if user == "guest":
        return 403
    if user == "boom":
        raise RuntimeError("hook failure with a secret inside")
    return "yes"  # anything but True denies


async def async_hook(request: Any) -> bool:
    await asyncio.sleep(0)
    return request.url.path.startswith("/public")


async def test_auth_hook() -> None:
    hook = f"{__name__}:allow_if_header"
    async with Front(FrontOptions(auth=hook)) as f, httpx.AsyncClient(base_url=f"http://127.0.0.1:{f.port}") as c:
        assert (await c.get("/", headers={"x-user": "admin"})).status_code == 200
        r = await c.get("/", headers={"x-user": "guest"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert (await c.get("/", headers={"x-user": "other"})).status_code == 401
        r = await c.get("/", headers={"x-user": "boom"})
        assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text
        assert (await c.get("/-/healthz")).status_code == 200
    # With API keys too, both must pass.
    options = FrontOptions(api_keys=(KEY,), auth=f"{__name__}:async_hook")
    async with Front(options) as f, httpx.AsyncClient(base_url=f"http://127.0.0.1:{f.port}") as c:
        assert (await c.get("/public/x", headers={"x-api-key": KEY})).status_code == 200
        assert (await c.get("/private", headers={"x-api-key": KEY})).status_code == 401
        assert (await c.get("/public/x")).status_code == 401


# ---- configuration -------------------------------------------------------------------------


def test_api_key_options(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as info:
        HTTPOptions(api_keys=["short-secret"])
    assert "too short" in str(info.value) and "short-secret" not in str(info.value)
    with pytest.raises(ValidationError):
        HTTPOptions(api_keys=["with space inside the key"])
    with pytest.raises(ValidationError):
        HTTPOptions(api_keys_env="not a name")
    assert KEY not in repr(HTTPOptions(api_keys=[KEY]))

    monkeypatch.setenv("SHOAL_TEST_KEYS", f"{KEY}, {OTHER_KEY}")
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# the team's key\n{OTHER_KEY}\n\n{'f' * 20}  # another\n")
    http = HTTPOptions(api_keys=[KEY], api_keys_env="SHOAL_TEST_KEYS", api_keys_file=str(keys_file))
    assert http.requires_auth
    assert http.resolved_api_keys() == (KEY, OTHER_KEY, "f" * 20)
    front = FrontOptions.of(http)
    assert front.api_keys == (KEY, OTHER_KEY, "f" * 20)
    assert KEY not in repr(front)

    monkeypatch.delenv("SHOAL_TEST_KEYS")
    with pytest.raises(ValueError, match="api_keys_env: environment variable SHOAL_TEST_KEYS holds no API key"):
        FrontOptions.of(HTTPOptions(api_keys_env="SHOAL_TEST_KEYS"))
    monkeypatch.setenv("SHOAL_TEST_KEYS", "tooshort")
    with pytest.raises(ValueError, match="too short") as err:
        HTTPOptions(api_keys_env="SHOAL_TEST_KEYS").resolved_api_keys()
    assert "tooshort" not in str(err.value)
    with pytest.raises(ValidationError, match="no such file"):
        HTTPOptions(api_keys_file=str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="module:function"):
        HTTPOptions(auth="not a path")
    assert not HTTPOptions().requires_auth and HTTPOptions(auth="pkg.mod:fn").requires_auth


def test_tls_options_are_checked_when_loaded(tmp_path: Any) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(ValidationError, match=r"ssl_certfile[\s\S]*no such file"):
        HTTPOptions(ssl_certfile=str(tmp_path / "nope.pem"), ssl_keyfile=str(key))
    with pytest.raises(ValidationError, match="must be given together"):
        HTTPOptions(ssl_certfile=str(cert))
    with pytest.raises(ValidationError, match="need ssl_certfile"):
        HTTPOptions(ssl_ca_certs=str(cert))
    http = HTTPOptions(ssl_certfile=str(cert), ssl_keyfile=str(key), ssl_keyfile_password="pw")
    assert http.scheme == "https" and HTTPOptions().scheme == "http"
    assert "pw" not in repr(http).replace("password", "")
    front = FrontOptions.of(http)
    assert front.ssl_certfile == str(cert) and os.path.isabs(front.ssl_keyfile)
    assert ssl_config(front) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key), "ssl_keyfile_password": "pw"}
    mtls = ssl_config(FrontOptions(ssl_certfile="c", ssl_keyfile="k", ssl_ca_certs="ca"))
    assert mtls["ssl_ca_certs"] == "ca" and mtls["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert ssl_config(FrontOptions()) == {}


def test_limits_options() -> None:
    front = FrontOptions.of(HTTPOptions())
    assert front.max_request_body_bytes == 100 * 1024 * 1024 and front.max_header_bytes == 64 * 1024
    with pytest.raises(ValidationError):
        HTTPOptions(max_request_body_bytes=0)
    with pytest.raises(ValidationError):
        HTTPOptions(max_header_bytes=100)


def test_exposure_warning() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
        assert exposure_warning(HTTPOptions(host=host)) == ""
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not is_loopback(host)
        assert "no authentication" in exposure_warning(HTTPOptions(host=host))
        assert exposure_warning(HTTPOptions(host=host, api_keys=[KEY])) == ""
        assert exposure_warning(HTTPOptions(host=host, auth="pkg.mod:fn")) == ""
