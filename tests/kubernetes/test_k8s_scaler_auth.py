"""The scaler's bearer token (``--scaler-auth bearer``, the default): the server refuses every route
but the probes without it (real sockets on 127.0.0.1), callers' demand posts carry it, the scaler
refuses to start without one, ``--scaler-auth none`` drops the TriggerAuthentication, and
``--create-secret`` keeps the token with the app's other stored secrets."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shoal.exceptions import CompileError
from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.pod.discovery import WakeConfig, _Demand
from shoal.kubernetes.scaler.client import http_call
from shoal.kubernetes.scaler.server import OPEN_PATHS, ScalerServer, token_matches
from shoal.kubernetes.secretstore import load_or_create
from shoal.kubernetes.targets import load_apps

HERE = Path(__file__).resolve().parent
APP = "scale"
TOKEN = "s3cret-token-0123456789abcdef"


def build(tmp: Path, **opts: Any) -> list[dict[str, Any]]:
    sys.path.insert(0, str(HERE))
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": APP, "route_prefix": "/",
                                                      "import_path": "k8s_scale_app:app"}]}))
    apps, http = load_apps(str(path))
    return compile_apps([(a.spec, a.entry) for a in apps], CompileOptions(image="shoal:test", **opts),
                        http_options=http).objects


class Recorder:
    """A stand-in for the scaler's routes: records what got through."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        self.calls.append((method, path))
        return (202 if method == "POST" else 200), {"desired": 1}


async def _serve(handler: Recorder, token: str | None) -> ScalerServer:
    server = ScalerServer(handler, token=token)
    await server.start("127.0.0.1", 0)
    return server


def test_token_compare() -> None:
    token = TOKEN.encode()
    assert token_matches(b"Bearer " + token, token)
    assert token_matches(b"bearer  " + token + b" ", token)  # scheme case-insensitive, spaces trimmed
    for bad in (None, b"", b"Bearer", b"Bearer x", b"Basic " + token, token, b"Bearer " + token + b"x",
                b"Bearer " + token[:-1]):
        assert not token_matches(bad, token), bad


def test_server_requires_the_token_except_on_probes() -> None:
    async def main() -> None:
        handler = Recorder()
        server = await _serve(handler, TOKEN)
        port = server.port
        try:
            for method, path in (("GET", "/scale/Worker"), ("POST", "/demand/Worker"), ("GET", "/status")):
                status, body = await http_call("127.0.0.1", port, method, path)
                assert status == 401 and b"Bearer" in body, (path, status, body)
                status, _ = await http_call("127.0.0.1", port, method, path, bearer="wrong-token")
                assert status == 401
                status, _ = await http_call("127.0.0.1", port, method, path, bearer=TOKEN)
                assert status in (200, 202)
            for path in sorted(OPEN_PATHS):  # the kubelet's probes carry no credentials
                status, _ = await http_call("127.0.0.1", port, "GET", path)
                assert status == 200
            assert handler.calls == [("GET", "/scale/Worker"), ("POST", "/demand/Worker"), ("GET", "/status"),
                                     *[("GET", p) for p in sorted(OPEN_PATHS)]]
            assert server.unauthorized == 6
            # The 401 names the scheme; two Authorization headers are refused outright.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                         + b"\r\nAuthorization: Bearer other\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 400")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Bearer\r\n" in answer
        finally:
            server.close()

    asyncio.run(main())


def test_server_without_a_token_is_open_and_an_empty_token_is_refused() -> None:
    async def main() -> None:
        handler = Recorder()
        server = await _serve(handler, None)
        try:
            status, _ = await http_call("127.0.0.1", server.port, "GET", "/scale/Worker")
            assert status == 200
        finally:
            server.close()

    asyncio.run(main())
    with pytest.raises(ValueError, match="empty"):
        ScalerServer(Recorder(), token="  ")


def test_callers_post_demand_with_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    config = WakeConfig.from_env({names.ENV_APP: APP, names.ENV_SCALER_URL: "http://127.0.0.1:1",
                                  names.ENV_SCALER_TOKEN: f" {TOKEN}\n"})
    assert config.scaler_token == TOKEN
    assert WakeConfig.from_env({names.ENV_APP: APP}).scaler_token is None

    async def main() -> tuple[int, int, list[tuple[str, str]]]:
        handler = Recorder()
        server = await _serve(handler, TOKEN)
        loop = asyncio.get_running_loop()
        backend: Any = type("Backend", (), {"loop": loop, "resolver": None})()
        try:
            results = []
            for token in (TOKEN, "not-the-token"):
                demand = _Demand(backend, WakeConfig(app=APP, scaler_url=f"http://127.0.0.1:{server.port}",
                                                     scaler_token=token))
                demand.signal(APP, "Worker")
                for _ in range(500):  # each post is bounded (DEMAND_TIMEOUT_S); this only waits for it
                    if not demand.in_flight:
                        break
                    await asyncio.sleep(0.01)
                results.append((demand.posted, demand.failed))
            return results[0][0], results[1][1], handler.calls
        finally:
            server.close()

    posted, failed, calls = asyncio.run(main())
    assert posted == 1 and failed == 1
    assert calls == [("POST", "/demand/Worker")]  # the wrong token never reached the routes


def test_scaler_command_refuses_to_start_without_its_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.kubernetes.scaler.command import _serve as serve_command

    sys.path.insert(0, str(HERE))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": APP, "import_path": "k8s_scale_app:app"}]}))
    monkeypatch.delenv(names.ENV_SCALER_TOKEN, raising=False)
    assert asyncio.run(serve_command(str(path), None, "127.0.0.1", 0, None, 2.0, 10.0, "bearer")) == 2
    monkeypatch.setenv(names.ENV_SCALER_TOKEN, "   ")
    assert asyncio.run(serve_command(str(path), None, "127.0.0.1", 0, None, 2.0, 10.0, "bearer")) == 2


def test_scaler_auth_none_and_hpa_have_no_trigger_authentication(tmp_path: Path) -> None:
    objs = build(tmp_path, scaler_auth="none")
    assert not [o for o in objs if o["kind"] == "TriggerAuthentication"]
    so = next(o for o in objs if o["kind"] == "ScaledObject")
    assert "authenticationRef" not in so["spec"]["triggers"][0]
    assert "authMode" not in so["spec"]["triggers"][0]["metadata"]
    assert names.ENV_SCALER_TOKEN not in str(objs)
    scaler = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == names.scaler_name(APP))
    assert scaler["spec"]["template"]["spec"]["containers"][0]["args"] == ["--port", str(names.SCALER_PORT)]
    with pytest.raises(CompileError, match="--scaler-auth must be 'bearer' or 'none'"):
        build(tmp_path, scaler_auth="basic")


def test_create_secret_keeps_the_token(tmp_path: Path) -> None:
    store = tmp_path / "secrets"
    material, _, changes = load_or_create(store, "default", APP, with_tls=False)
    assert material.scaler_token == "" and changes == ["created"]
    material, _, changes = load_or_create(store, "default", APP, with_tls=False, with_scaler_token=True)
    assert len(material.scaler_token) == 64 and changes == ["added the scaler's bearer token"]
    again, _, changes = load_or_create(store, "default", APP, with_tls=False, with_scaler_token=True)
    assert again == material and changes == []
    objs = build(tmp_path, create_secret=True, tls="off", secret_material={APP: material})
    (secret,) = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == "scale-scaler-token"]
    import base64

    assert base64.b64decode(secret["data"][names.SCALER_TOKEN_KEY]).decode() == material.scaler_token
