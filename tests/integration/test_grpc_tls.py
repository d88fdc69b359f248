"""The gRPC port is as protected as the HTTP one: with TLS in http_options the gRPC ingress serves
TLS with the same certificate (an encrypted key included) and, with ssl_ca_certs, requires client
certificates; a plaintext client is refused."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")
from conftest import child_pids, wait_until  # noqa: E402
from grpc_protos import compiled  # noqa: E402
from test_security import make_cert  # noqa: E402

from shoal import api, serve  # noqa: E402
from shoal.config import gRPCOptions  # noqa: E402

MODULE = "shoal_grpc_tls"
PROTO = """
syntax = "proto3";
package tlstest;
message Ping { string text = 1; }
message Pong { string text = 1; }
service Pinger { rpc Send(Ping) returns (Pong); }
"""


@serve.deployment
class Echo:
    def Send(self, request: Any) -> Any:
        return importlib.import_module(f"{MODULE}_pb2").Pong(text=f"pong {request.text}")


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with compiled(tmp_path_factory.mktemp("tlsprotos"), MODULE, PROTO) as d:
        yield d


def _call(channel: Any) -> str:
    pb2 = importlib.import_module(f"{MODULE}_pb2")
    stub = importlib.import_module(f"{MODULE}_pb2_grpc").PingerStub(channel)
    return str(stub.Send(pb2.Ping(text="x"), timeout=20).text)


def _start(run_dir: str, **tls: str) -> None:
    servicers = [f"{MODULE}_pb2_grpc.add_PingerServicer_to_server"]
    serve.start(http_options={"port": 0, **tls}, grpc_options=gRPCOptions(port=0, grpc_servicer_functions=servicers),
                _run_dir=run_dir)
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")


def test_grpc_serves_tls_with_an_encrypted_key(protos: Path, run_dir: str, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server", password="open sesame")
    before = child_pids()
    try:
        _start(run_dir, ssl_certfile=cert, ssl_keyfile=key, ssl_keyfile_password="open sesame")
        address = api.grpc_address()
        trusted = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        with grpc.secure_channel(address, trusted) as channel:
            assert _call(channel) == "pong x"
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            _call(channel)  # plaintext is not served
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10)


def test_grpc_mutual_tls_needs_a_client_certificate(protos: Path, run_dir: str, tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path, "server")
    client_cert, client_key = make_cert(tmp_path, "client")
    before = child_pids()
    try:
        _start(run_dir, ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certs=client_cert)
        address = api.grpc_address()
        anonymous = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        with grpc.secure_channel(address, anonymous) as channel, pytest.raises(grpc.RpcError) as err:
            _call(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        known = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes(),
                                             private_key=Path(client_key).read_bytes(),
                                             certificate_chain=Path(client_cert).read_bytes())
        with grpc.secure_channel(address, known) as channel:
            assert _call(channel) == "pong x"
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10)
