"""gRPC served by the ingress replicas themselves (``grpc_options.ingress_serves_grpc``): each
ingress replica listens on the shared gRPC port next to the proxy, runs its own app's calls
in-process and forwards other apps' calls through its routers. Which process takes a new
connection is the kernel's choice (SO_REUSEPORT), so the tests open channels until the access
log (``GRPC /path CODE``, written by the process whose server answered) shows where one landed.
"""

from __future__ import annotations

import asyncio
import glob
import importlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pytest

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")

from conftest import child_pids, wait_until  # noqa: E402

from shoal import api, serve  # noqa: E402
from shoal.config import gRPCOptions  # noqa: E402
from shoal.exceptions import gRPCStatusError  # noqa: E402
from shoal.grpc_util import RayServegRPCContext  # noqa: E402

MODULE = "shoal_grpc_fast"
KEY = "grpc-fast-key-0123456789"
AUTH = (("authorization", f"Bearer {KEY}"),)
TIMEOUT_S = 3.0  # grpc_options.request_timeout_s
CHANNELS = 40  # new channels tried to find one a given process serves (each lands there with p >= 1/3)
PROTO = """
syntax = "proto3";
package fasttest;
message Req { string text = 1; int32 count = 2; }
message Rep { string text = 1; int32 index = 2; string app = 3; int32 pid = 4; }
service Echo {
  rpc Say(Req) returns (Rep);
  rpc Repeat(Req) returns (stream Rep);
  rpc Fail(Req) returns (Rep);
  rpc Sleep(Req) returns (Rep);
  rpc Lookup(Req) returns (Rep);
  rpc Refuse(Req) returns (Rep);
  rpc RepeatRefuse(Req) returns (stream Rep);
}
"""
_ids = count()


def pb() -> Any:
    return importlib.import_module(f"{MODULE}_pb2")


@serve.deployment(graceful_shutdown_timeout_s=20)
class Front:
    def __init__(self) -> None:
        self.sleeps = 0

    def Say(self, request: Any) -> Any:
        return pb().Rep(text=f"hello {request.text}", app="a", pid=os.getpid())

    def Repeat(self, request: Any) -> Any:
        for i in range(request.count):
            yield pb().Rep(text=f"{request.text} {i}", index=i, app="a")

    def Fail(self, request: Any) -> Any:
        raise ValueError(f"bad input: {request.text}")

    async def Sleep(self, request: Any) -> Any:
        self.sleeps += 1
        await asyncio.sleep(request.count)
        return pb().Rep(text="slept", pid=os.getpid())

    def begun(self) -> int:
        return self.sleeps

    def Lookup(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        grpc_context.set_details(f"{request.text} not found")
        grpc_context.set_trailing_metadata([("num", "7")])
        return pb().Rep(text=request.text)

    def Refuse(self, request: Any) -> Any:
        raise gRPCStatusError(ValueError(request.text), grpc.StatusCode.FAILED_PRECONDITION, "not ready")

    def RepeatRefuse(self, request: Any, grpc_context: RayServegRPCContext) -> Any:
        yield pb().Rep(text="first")
        grpc_context.set_code(grpc.StatusCode.ABORTED)
        grpc_context.set_details("stopped after one")
        raise RuntimeError("stop")


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Busy:
    def Say(self, request: Any) -> Any:
        return pb().Rep(text=f"busy {request.text}", app="b", pid=os.getpid())

    async def Sleep(self, request: Any) -> Any:
        await asyncio.sleep(request.count)
        return pb().Rep(text="slept")


@dataclass
class Fast:
    address: str
    run_dir: str

    def stub(self, channel: Any) -> Any:
        return importlib.import_module(f"{MODULE}_pb2_grpc").EchoStub(channel)

    def logs(self, app: str) -> list[str]:
        """The log files of ``app``'s replicas ("proxy": the proxy's)."""
        if app == "proxy":
            return [os.path.join(self.run_dir, "logs", "proxy.log")]
        return glob.glob(os.path.join(self.run_dir, "logs", app, "*", "*.log"))

    def answered_by(self, request_id: str, timeout: float = 10.0) -> str:
        """Which process's gRPC server answered the call ``request_id``: "proxy", "a" or "b"."""
        found: list[str] = []

        def look() -> bool:
            for who in ("proxy", "a", "b"):
                for path in self.logs(who):
                    with open(path, errors="replace") as f:
                        if any(f"request_id={request_id}:" in line and " GRPC /" in line for line in f):
                            found.append(who)
                            return True
            return False

        assert wait_until(look, timeout), f"no access-log line for {request_id}"
        return found[0]

    def channel_on(self, who: str) -> Any:
        """A channel whose connection the gRPC server of ``who`` ("a", "b" or "proxy") took."""
        for _ in range(CHANNELS):
            channel = grpc.insecure_channel(self.address)
            rid = f"probe-{next(_ids)}"
            self.stub(channel).Say(pb().Req(text="p"), metadata=md("a", ("request_id", rid)), timeout=30)
            if self.answered_by(rid) == who:
                return channel
            channel.close()
        raise AssertionError(f"none of {CHANNELS} new channels reached {who}'s gRPC server")


def _compile(folder: str) -> None:
    with open(os.path.join(folder, f"{MODULE}.proto"), "w") as f:
        f.write(PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{folder}", f"--python_out={folder}", f"--grpc_python_out={folder}",
                        os.path.join(folder, f"{MODULE}.proto")]) == 0


def _start(folder: str, run_dir: str, ingress_serves_grpc: bool = True, **tls: str) -> str:
    servicers = [f"{MODULE}_pb2_grpc.add_EchoServicer_to_server"]
    serve.start(http_options={"port": 0, "api_keys": [KEY], **tls},
                grpc_options=gRPCOptions(port=0, grpc_servicer_functions=servicers, request_timeout_s=TIMEOUT_S,
                                         ingress_serves_grpc=ingress_serves_grpc),
                _run_dir=run_dir)
    serve.run(Front.bind(), name="a", route_prefix="/a")
    serve.run(Busy.bind(), name="b", route_prefix="/b")
    return api.grpc_address()


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = str(tmp_path_factory.mktemp("fastprotos"))
    _compile(folder)
    sys.path.insert(0, folder)  # before serve.start: the proxy and replicas inherit it
    try:
        yield folder
    finally:
        sys.path.remove(folder)


@pytest.fixture(scope="module")
def fast(protos: str) -> Iterator[Fast]:
    run_dir = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    before = child_pids()
    address = ""
    try:
        address = _start(protos, run_dir)
        yield Fast(address, run_dir)
    finally:
        serve.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:  # nobody listens now
        importlib.import_module(f"{MODULE}_pb2_grpc").EchoStub(channel).Say(pb().Req(), metadata=md("a"), timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def md(app: str, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("application", app), *AUTH, *extra)


def trailing(err: Any) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


def test_switched_off_only_the_proxy_serves_grpc(protos: str) -> None:
    # First in the module: its own instance, before the module's instance starts.
    run_dir = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    before = child_pids()
    try:
        inst = Fast(_start(protos, run_dir, ingress_serves_grpc=False), run_dir)
        for i in range(8):
            with grpc.insecure_channel(inst.address) as channel:
                rid = f"off-{i}"
                inst.stub(channel).Say(pb().Req(text="x"), metadata=md("a", ("request_id", rid)), timeout=30)
                assert inst.answered_by(rid) == "proxy"
    finally:
        serve.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def test_replicas_serve_tls_as_the_proxy_does(protos: str, tmp_path: Path) -> None:
    # Before the module's instance starts, too. The replicas' servers use the HTTP port's certificate.
    from test_security import make_cert

    cert, key = make_cert(tmp_path, "server")
    run_dir = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    before = child_pids()
    try:
        inst = Fast(_start(protos, run_dir, ssl_certfile=cert, ssl_keyfile=key), run_dir)
        trusted = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
        where = set()
        for i in range(CHANNELS // 2):
            with grpc.secure_channel(inst.address, trusted) as channel:
                rid = f"tls-{i}"
                inst.stub(channel).Say(pb().Req(text="x"), metadata=md("a", ("request_id", rid)), timeout=30)
                where.add(inst.answered_by(rid))
            with grpc.insecure_channel(inst.address) as channel, pytest.raises(grpc.RpcError) as err:
                inst.stub(channel).Say(pb().Req(text="x"), metadata=md("a"), timeout=30)  # no plaintext anywhere
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "a" in where, f"no TLS call reached app a's replica: {where}"
    finally:
        serve.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def test_replicas_serve_their_own_calls_and_forward_other_apps(fast: Fast) -> None:
    served: dict[tuple[str, str], list[str]] = {}
    for i in range(CHANNELS):
        with grpc.insecure_channel(fast.address) as channel:
            stub = fast.stub(channel)
            for app, text in (("a", "hello"), ("b", "busy")):
                rid = f"spread-{app}-{i}"
                reply = stub.Say(pb().Req(text=str(i)), metadata=md(app, ("request_id", rid)), timeout=30)
                assert (reply.text, reply.app) == (f"{text} {i}", app)
                served.setdefault((app, fast.answered_by(rid)), []).append(rid)
    assert served.get(("a", "a")), f"no call of app a was answered by its replica: {served}"
    # A call for app b that app a's replica took went to b's replica through a's router: b's
    # replica logged it as a routed call (CALL Say), not as a gRPC call of its own.
    forwarded = served.get(("b", "a"))
    assert forwarded, f"no call of app b reached app a's replica: {served}"
    b_log = ""
    for path in fast.logs("b"):
        with open(path, errors="replace") as f:
            b_log += f.read()
    for rid in forwarded:
        assert f"request_id={rid}: CALL Say OK" in b_log
    # Every call is counted under Ray's gRPC metric names, whichever process answered it.
    assert wait_until(lambda: _grpc_count("/fasttest.Echo/Say", "Front") >= CHANNELS, 30)
    assert wait_until(lambda: _grpc_count("/fasttest.Echo/Say", "Busy") >= CHANNELS, 30)


def _grpc_count(method: str, deployment: str) -> float:
    """``ray_serve_num_grpc_requests_total`` of ``method`` with status OK on the instance's /metrics."""
    import httpx

    r = httpx.get(serve.status().http_address + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    total = 0.0
    for line in r.text.splitlines() if r.status_code == 200 else ():
        if line.startswith("ray_serve_num_grpc_requests_total{") and f'method="{method}"' in line \
                and 'status_code="OK"' in line and f'deployment="{deployment}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_status_codes_and_streams_on_a_replica(fast: Fast) -> None:
    channel = fast.channel_on("a")
    stub = fast.stub(channel)
    try:
        replies = list(stub.Repeat(pb().Req(text="n", count=3), metadata=md("a"), timeout=30))
        assert [(r.text, r.index) for r in replies] == [("n 0", 0), ("n 1", 1), ("n 2", 2)]
        with pytest.raises(grpc.RpcError) as err:
            stub.Fail(pb().Req(text="zzz"), metadata=md("a", ("request_id", "r-fail")), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INTERNAL, "ValueError: bad input: zzz")
        assert trailing(err.value)["request_id"] == "r-fail"
        assert fast.answered_by("r-fail") == "a"
        with pytest.raises(grpc.RpcError) as err:
            stub.Lookup(pb().Req(text="k"), metadata=md("a"), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "k not found")
        assert trailing(err.value)["num"] == "7"
        with pytest.raises(grpc.RpcError) as err:
            stub.Refuse(pb().Req(text="x"), metadata=md("a"), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.FAILED_PRECONDITION, "not ready")
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for reply in stub.RepeatRefuse(pb().Req(text="s"), metadata=md("a"), timeout=30):
                got.append(reply.text)
        assert got == ["first"] and err.value.code() == grpc.StatusCode.ABORTED
        with pytest.raises(grpc.RpcError) as err:
            stub.Sleep(pb().Req(count=60), metadata=md("a"), timeout=60)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                           f"request timed out after {TIMEOUT_S:g} s")
        with pytest.raises(grpc.RpcError) as err:
            stub.Say(pb().Req(text="x"), metadata=(("application", "a"),), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Say(pb().Req(text="x"), metadata=md("nope"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'nope' not found" in err.value.details()
    finally:
        channel.close()


def test_a_full_replica_answers_resource_exhausted(fast: Fast) -> None:
    # On app b's own replica: Busy runs one call and queues one more in its slots; a third is refused.
    channel = _channel_on_b(fast)
    stub = fast.stub(channel)
    running = [stub.Sleep.future(pb().Req(count=60), metadata=md("b"), timeout=60) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                stub.Say(pb().Req(text="x"), metadata=md("b", ("request_id", f"full-{next(_ids)}")), timeout=30)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "max_queued_requests=1" in e.details()
                break
            assert time.monotonic() < deadline, "the third call was never refused"
            time.sleep(0.1)  # the two sleeps are not both admitted yet
    finally:
        for f in running:
            f.cancel()
        channel.close()


def _channel_on_b(fast: Fast) -> Any:
    for _ in range(CHANNELS):
        channel = grpc.insecure_channel(fast.address)
        rid = f"probe-b-{next(_ids)}"
        fast.stub(channel).Say(pb().Req(text="p"), metadata=md("b", ("request_id", rid)), timeout=30)
        if fast.answered_by(rid) == "b":
            return channel
        channel.close()
    raise AssertionError(f"none of {CHANNELS} new channels reached b's gRPC server")


def _begun() -> int:
    return int(serve.get_app_handle("a").begun.remote().result(timeout_s=30))


def test_a_replica_killed_mid_call_fails_the_call_unavailable(fast: Fast) -> None:
    channel = fast.channel_on("a")
    stub = fast.stub(channel)
    pid = stub.Say(pb().Req(text="pid"), metadata=md("a"), timeout=30).pid
    begun = _begun()
    future = stub.Sleep.future(pb().Req(count=60), metadata=md("a"), timeout=60)
    try:
        assert wait_until(lambda: _begun() > begun, 15)  # running in the replica
        os.kill(pid, signal.SIGKILL)
        err = future.exception(timeout=30)  # a hang raises grpc.FutureTimeoutError here
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
    finally:
        future.cancel()
        channel.close()

    def served_again() -> bool:
        try:
            with grpc.insecure_channel(fast.address) as ch:
                return bool(fast.stub(ch).Say(pb().Req(text="z"), metadata=md("a"), timeout=5).pid != pid)
        except grpc.RpcError:
            return False

    assert wait_until(served_again, 60, 0.2)


def test_deleting_the_app_lets_running_calls_finish(fast: Fast) -> None:
    # Runs last: app a goes away. Its replica drains: the server takes no new call, and the
    # call running there still gets its answer (within graceful_shutdown_timeout_s).
    channel = fast.channel_on("a")
    stub = fast.stub(channel)
    begun = _begun()
    future = stub.Sleep.future(pb().Req(count=2), metadata=md("a"), timeout=60)
    try:
        assert wait_until(lambda: _begun() > begun, 15)
        deleter = threading.Thread(target=serve.delete, args=("a",))
        deleter.start()
        assert future.result(timeout=30).text == "slept"
        deleter.join(60)
        assert not deleter.is_alive()
    finally:
        future.cancel()
        channel.close()
    with grpc.insecure_channel(fast.address) as ch, pytest.raises(grpc.RpcError) as err:
        fast.stub(ch).Say(pb().Req(text="x"), metadata=md("a"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
