"""Security through shoal's real processes, on both HTTP fronts: the proxy process
(``ingress_serves_http: false``) and an ingress replica serving HTTP itself (the default).

Limits (413, 431), API keys and the auth hook (401/403), TLS and mutual TLS, what listens where
and with which permissions, and that clients never see tracebacks while the logs do.
"""

from __future__ import annotations

import glob
import os
import shutil
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import child_pids, wait_until
from sec_apps import SECRET, Shop
from starlette.requests import Request

from shoal import serve
from shoal.schema import ConfigError, ServeDeploySchema

FRONTS = pytest.mark.parametrize("front", ["replica", "proxy"])
KEY = "test-key-0123456789abcdef"
OTHER_KEY = "test-key-fedcba9876543210"


@contextmanager
def shoal_instance(run_dir: str, front: str = "replica", **http: Any) -> Iterator[str]:
    """An instance with these http_options on a free port; no process left behind after it."""
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": front == "replica", **http}, _run_dir=run_dir)
    try:
        yield serve.http_address()
    finally:
        serve.shutdown()
        assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


@serve.deployment
class Recorder:
    """Answers with the size of the body and the scheme; remembers the sizes it saw."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        self.sizes.append(len(body))
        return {"size": len(body), "scheme": request.url.scheme}

    def seen(self) -> list[int]:
        return self.sizes


# ---- limits --------------------------------------------------------------------------------


@FRONTS
def test_oversized_requests_are_refused_before_reaching_the_app(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front, max_request_body_bytes=1000, max_header_bytes=2048) as url:
        handle = serve.run(Recorder.bind())
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.post("/", content=b"x" * 1000).json()["size"] == 1000
            r = c.post("/", content=b"x" * 1001)
            assert r.status_code == 413
            assert r.json() == {"error": "request body too large", "request_id": r.headers["x-request-id"]}

            def chunks() -> Iterator[bytes]:
                yield from (b"y" * 300 for _ in range(5))

            r = c.post("/", content=chunks())  # chunked: no content-length to go by
            assert r.status_code == 413 and r.json()["error"] == "request body too large"
            r = c.get("/", headers={"x-big": "h" * 3000})
            assert r.status_code == 431
            assert r.json()["error"] == "request header fields too large"
            assert c.get("/", headers={"x-fine": "h" * 1000}).status_code == 200
            assert c.get("/-/healthz").status_code == 200
        assert handle.seen.remote().result() == [1000, 0]


# ---- API keys and the auth hook -----------------------------------------------------------


@FRONTS
def test_api_keys_from_the_environment_and_an_auth_hook(run_dir: str, front: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_TEST_API_KEYS", f"{KEY}, {OTHER_KEY}")
    with shoal_instance(run_dir, front, api_keys_env="SHOAL_TEST_API_KEYS", auth="sec_apps:team_blue_only") as url:
        handle = serve.run(Recorder.bind())
        blue = {"x-team": "blue"}
        with httpx.Client(base_url=url, timeout=10) as c:
            for path in ("/", "/-/routes", "/not/routed"):
                r = c.post(path, content=b"payload", headers=blue)
                assert r.status_code == 401, path
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json() == {"error": "unauthorized", "request_id": r.headers["x-request-id"]}
            assert c.get("/", headers={**blue, "authorization": "Bearer " + KEY[:-1] + "x"}).status_code == 401
            assert c.get("/-/healthz").status_code == 200
            assert c.post("/", content=b"abc", headers={**blue, "authorization": f"Bearer {KEY}"}).status_code == 200
            assert c.post("/", content=b"abcd", headers={**blue, "x-api-key": OTHER_KEY}).status_code == 200
            r = c.get("/", headers={"x-team": "red", "x-api-key": KEY})
            assert r.status_code == 403 and r.json()["error"] == "forbidden"
            assert c.get("/", headers={"x-api-key": KEY}).status_code == 401
        assert handle.seen.remote().result() == [3, 4]


def test_missing_api_keys_variable_fails_the_start(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_TEST_NO_KEYS", raising=False)
    before = child_pids()
    with pytest.raises(ValueError, match="SHOAL_TEST_NO_KEYS holds no API key"):
        serve.start(http_options={"port": 0, "api_keys_env": "SHOAL_TEST_NO_KEYS"}, _run_dir=run_dir)
    serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10)


# ---- TLS -----------------------------------------------------------------------------------


def make_cert(directory: Path, name: str, password: str | None = None) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (encrypted with ``password``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
         *(["-passout", f"pass:{password}"] if password else ["-nodes"])],
        check=True, capture_output=True, timeout=30,
    )
    return str(cert), str(key)


@FRONTS
def test_https(run_dir: str, front: str, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", password="correct horse battery")
    trusted = ssl.create_default_context(cafile=cert)
    with shoal_instance(run_dir, front, ssl_certfile=cert, ssl_keyfile=key,
                        ssl_keyfile_password="correct horse battery") as url:
        assert url.startswith("https://127.0.0.1:")
        assert serve.status().http_address == url
        assert httpx.get(url + "/nothing", verify=trusted).status_code == 404  # the proxy process answers
        serve.run(Recorder.bind())
        assert httpx.get(url + "/", verify=trusted).json() == {"size": 0, "scheme": "https"}
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://") + "/", timeout=5)  # plain HTTP is not served
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/", timeout=5)  # a client that does not trust the certificate
        assert httpx.get(url + "/", verify=trusted).status_code == 200  # still serving


def test_mutual_tls(run_dir: str, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    with shoal_instance(run_dir, ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=client_cert) as url:
        serve.run(Recorder.bind())
        anonymous = ssl.create_default_context(cafile=cert)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/", verify=anonymous, timeout=5)
        known = ssl.create_default_context(cafile=cert)
        known.load_cert_chain(client_cert, client_key)
        assert httpx.get(url + "/", verify=known).json()["scheme"] == "https"


def test_tls_files_are_checked_at_config_time(tmp_path: Path) -> None:
    missing = {"ssl_certfile": str(tmp_path / "missing.pem"), "ssl_keyfile": str(tmp_path / "missing.key")}
    with pytest.raises(ValueError, match=r"ssl_certfile: .*no such file"):
        serve.start(http_options={"port": 0, **missing}, _run_dir=str(tmp_path / "i"))
    config = {"http_options": missing, "applications": [{"import_path": "mod:app"}]}
    with pytest.raises(ConfigError, match=r"serve.yaml: http_options.ssl_certfile: no such file \(got '/"):
        ServeDeploySchema.from_dict(config, source="serve.yaml")


# ---- closed by default --------------------------------------------------------------------


def tcp_listeners(port: int) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


def test_listens_on_loopback_with_private_sockets() -> None:
    parent = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    run_dir = os.path.join(parent, "inst")  # shoal creates it
    try:
        with shoal_instance(run_dir) as url:
            assert url.startswith("http://127.0.0.1:")
            port = int(url.rsplit(":", 1)[1])
            assert tcp_listeners(port) == {"0100007F"}  # 127.0.0.1, and nothing else (no 0.0.0.0, no ::)
            serve.run(Recorder.bind())
            assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
            sockets = [p for p in glob.glob(os.path.join(run_dir, "*")) if stat.S_ISSOCK(os.stat(p).st_mode)]
            names = {os.path.basename(p) for p in sockets}
            assert "controller.sock" in names and any(n.startswith("r-") for n in names), names
            for path in [*sockets, os.path.join(run_dir, "secret")]:
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory of another user needs root")
def test_an_instance_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    (theirs / "secret").write_bytes(b"s" * 32)  # their secret, which a client must never trust
    os.chown(theirs, 65534, 65534)
    before = child_pids()
    with pytest.raises(PermissionError, match="belongs to another user"):
        serve.start(http_options={"port": 0}, _run_dir=str(theirs))
    assert child_pids() == before


# ---- errors -------------------------------------------------------------------------------


@serve.deployment
class Leaky:
    async def __call__(self, request: Request) -> None:
        raise KeyError(f"api token {SECRET} expired")


def _logs(run_dir: str, captured: str) -> str:
    texts = [captured]
    for path in glob.glob(os.path.join(run_dir, "**", "*.log"), recursive=True):
        with open(path, errors="replace") as f:
            texts.append(f.read())
    return "\n".join(texts)


@FRONTS
def test_bad_json_is_422_and_errors_never_leak(run_dir: str, front: str, capfd: pytest.CaptureFixture[str]) -> None:
    with shoal_instance(run_dir, front) as url:
        serve.run(Shop.bind(), name="shop", route_prefix="/shop")
        serve.run(Leaky.bind(), name="leaky", route_prefix="/leaky")
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.post("/shop/items", json={"name": "tea", "price": 2.5}).json() == {"name": "tea", "price": 2.5}
            # Malformed JSON, and JSON of the wrong shape: FastAPI's 422; bytes that are not
            # even UTF-8: FastAPI's 400 ("error parsing the body").
            for body, status in ((b'{"name": "tea", "price": ', 422), (b"[1, 2]", 422), (b'{"name": 1}', 422),
                                 (b"\xff\xfe not json", 400)):
                r = c.post("/shop/items", content=body, headers={"content-type": "application/json"})
                assert r.status_code == status, body
                assert "detail" in r.json() and "Traceback" not in r.text
            responses = [c.get("/shop/fail"), c.get("/leaky"), c.post("/leaky", content=b"{}")]
            for r in responses:
                assert r.status_code == 500
                assert SECRET not in r.text and "Traceback" not in r.text and "File \"" not in r.text
            assert responses[1].json() == {"error": "internal server error",
                                           "request_id": responses[1].headers["x-request-id"]}
            assert c.get("/-/healthz").status_code == 200
        wait_until(lambda: _logs(run_dir, "").count("Traceback") >= 3, 3)
        logs = _logs(run_dir, capfd.readouterr().err)
    # The logs do get the tracebacks, with the message.
    assert "Traceback" in logs and f"api token {SECRET} expired" in logs and f"password is {SECRET}" in logs
