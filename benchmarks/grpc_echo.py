"""The ``grpc`` workload: a unary and a server-streaming echo RPC through each framework's gRPC ingress.

``run.py --only grpc`` uses this module: it compiles :data:`PROTO` with ``grpcio-tools`` into the
run's scratch folder, starts ``benchmarks/apps/grpc_echo.py`` through the launcher with
``--grpc-port`` (``serve.start(grpc_options=gRPCOptions(...))`` under shoal or Ray Serve, with
that folder on ``PYTHONPATH`` so that the proxy and the replicas import the same generated
modules), waits until a unary call answers, and drives it with grpcio's asyncio client from
the runner process:

- unary: ``callers`` tasks on one channel, each calling ``Unary`` back to back (closed loop) for
  the run's duration after a discarded warm-up at the same concurrency: calls/s, p50, p99;
- streaming: the same with ``Stream`` (``messages`` replies per call, read to the end):
  messages/s over the whole run, time to first message p50/p99, whole-stream p50.

Every call carries the ``application`` metadata key (the app is deployed as ``bench``). A call
that fails is counted (``errors``, with the first one's status) and left out of the latencies.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from benchmarks.common import log, percentile

MODULE = "bench_echo"
APP = "grpc_echo"  # benchmarks/apps/grpc_echo.py
METADATA = (("application", "bench"),)
CALL_TIMEOUT_S = 30.0
PROTO = """
syntax = "proto3";
package benchecho;

message EchoRequest {
  string text = 1;
  int32 count = 2;
}

message EchoReply {
  string text = 1;
  int32 index = 2;
}

service Echo {
  rpc Unary(EchoRequest) returns (EchoReply);
  rpc Stream(EchoRequest) returns (stream EchoReply);
}
"""


class Launched(Protocol):
    """What :func:`wait_ready` needs of a started server (``run.Server``)."""

    def exited(self) -> int | None: ...

    def log_tail(self, n: int = 30) -> str: ...


def compile_proto(workdir: str) -> str:
    """Compile :data:`PROTO` into ``WORKDIR/grpc-proto`` (once per run); returns that folder."""
    folder = os.path.join(workdir, "grpc-proto")
    if os.path.exists(os.path.join(folder, f"{MODULE}_pb2_grpc.py")):
        return folder
    from grpc_tools import protoc

    os.makedirs(folder, exist_ok=True)
    proto = os.path.join(folder, f"{MODULE}.proto")
    with open(proto, "w") as f:
        f.write(PROTO)
    code = protoc.main(["protoc", f"-I{folder}", f"--python_out={folder}", f"--grpc_python_out={folder}", proto])
    if code != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({code}) on {proto}")
    return folder


def modules(folder: str) -> tuple[Any, Any]:
    """The generated ``bench_echo_pb2`` and ``bench_echo_pb2_grpc``, importable from ``folder``."""
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(f"{MODULE}_pb2"), importlib.import_module(f"{MODULE}_pb2_grpc")


async def _unary_once(stub: Any, pb2: Any) -> None:
    reply = await stub.Unary(pb2.EchoRequest(text="ping"), metadata=METADATA, timeout=CALL_TIMEOUT_S)
    if reply.text != "ping":
        raise RuntimeError(f"Unary answered {reply!r}, expected text 'ping'")


def wait_ready(target: str, folder: str, server: Launched, timeout_s: float) -> float:
    """Call ``Unary`` until it answers (or the server exits, or ``timeout_s`` passes); seconds waited."""
    import grpc

    pb2, pb2_grpc = modules(folder)
    t0 = time.perf_counter()
    last = ""

    async def attempt() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            await asyncio.wait_for(_unary_once(pb2_grpc.EchoStub(channel), pb2), 5.0)

    while True:
        code = server.exited()
        if code is not None:
            raise RuntimeError(f"the gRPC app exited with {code}:\n{server.log_tail()}")
        try:
            asyncio.run(attempt())
            return time.perf_counter() - t0
        except (grpc.aio.AioRpcError, TimeoutError, OSError) as e:
            last = f"{type(e).__name__}: {e}"[:300]
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"no gRPC answer on {target} within {timeout_s:.0f} s ({last}):\n{server.log_tail()}")
        time.sleep(0.05)


async def _closed_loop(call: Callable[[], Awaitable[None]], callers: int, seconds: float) -> tuple[int, float]:
    """``callers`` tasks each awaiting ``call()`` back to back for ``seconds``; (calls, wall seconds).

    The wall time runs until the last caller's last call ends (a stream started before the
    deadline is read to its end). Failed calls raise out of ``call`` and are counted by it.
    """
    done = 0
    t0 = time.perf_counter()
    stop = t0 + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    try:  # a watchdog, not a per-call timeout (each call has its own deadline)
        await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(callers))), seconds + 2 * CALL_TIMEOUT_S)
    except TimeoutError:
        raise RuntimeError(f"{callers} gRPC callers still busy {2 * CALL_TIMEOUT_S:.0f} s after the run") from None
    return done, time.perf_counter() - t0


async def unary_load(target: str, folder: str, callers: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    """Closed-loop unary calls: calls/s, p50/p99 latency (successful calls only), errors."""
    import grpc

    pb2, pb2_grpc = modules(folder)
    request = pb2.EchoRequest(text="ping")
    lat: list[float] = []
    errors: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb2_grpc.EchoStub(channel)

        async def call() -> None:
            t = time.perf_counter()
            try:
                await stub.Unary(request, metadata=METADATA, timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                return
            lat.append(time.perf_counter() - t)

        await _closed_loop(call, callers, warmup_s)
        lat.clear()
        errors.clear()
        _, wall = await _closed_loop(call, callers, seconds)
    ok = len(lat)
    if not ok:
        raise RuntimeError(f"no unary call succeeded at c{callers}: {errors[0] if errors else 'none made'}")
    return {"callers": callers, "calls": ok, "errors": len(errors), "first_error": errors[0] if errors else None,
            "seconds": wall, "calls_per_s": ok / wall, "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3}


async def stream_load(target: str, folder: str, callers: int, messages: int, seconds: float,
                      warmup_s: float) -> dict[str, Any]:
    """Closed-loop server streams of ``messages`` replies: messages/s, time to first message, errors."""
    import grpc

    pb2, pb2_grpc = modules(folder)
    request = pb2.EchoRequest(text="tok", count=messages)
    ttfm: list[float] = []
    whole: list[float] = []
    received = 0
    errors: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb2_grpc.EchoStub(channel)

        async def call() -> None:
            nonlocal received
            t = time.perf_counter()
            n = 0
            first = None
            try:
                async for _reply in stub.Stream(request, metadata=METADATA, timeout=CALL_TIMEOUT_S):
                    if first is None:
                        first = time.perf_counter() - t
                    n += 1
            except grpc.aio.AioRpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")
                received += n
                return
            received += n
            if n != messages:
                errors.append(f"OK with {n} of {messages} messages")
                return
            if first is not None:
                ttfm.append(first)
            whole.append(time.perf_counter() - t)

        await _closed_loop(call, callers, warmup_s)
        ttfm.clear()
        whole.clear()
        errors.clear()
        received = 0
        _, wall = await _closed_loop(call, callers, seconds)
    if not whole:
        raise RuntimeError(f"no stream completed at c{callers}: {errors[0] if errors else 'none made'}")
    return {"callers": callers, "messages_per_stream": messages, "streams": len(whole), "messages": received,
            "errors": len(errors), "first_error": errors[0] if errors else None, "seconds": wall,
            "messages_per_s": received / wall, "streams_per_s": len(whole) / wall,
            "ttfm_p50_ms": percentile(ttfm, 50) * 1e3, "ttfm_p99_ms": percentile(ttfm, 99) * 1e3,
            "stream_p50_ms": percentile(whole, 50) * 1e3}


def drive(target: str, folder: str, callers: tuple[int, ...], messages: int, seconds: float,
          warmup_s: float) -> dict[str, Any]:
    """Unary then streaming, at each concurrency in ``callers``; one result dict for the framework."""
    res: dict[str, Any] = {"unary": {}, "stream": {}, "messages_per_stream": messages}
    for c in callers:
        u = asyncio.run(unary_load(target, folder, c, seconds, warmup_s))
        res["unary"][f"c{c}"] = u
        log(f"    unary c{c}: {u['calls_per_s']:.0f} calls/s, p50 {u['p50_ms']:.3f} ms, p99 {u['p99_ms']:.3f} ms"
            + (f", {u['errors']} errors ({u['first_error']})" if u["errors"] else ""))
    for c in callers:
        s = asyncio.run(stream_load(target, folder, c, messages, seconds, warmup_s))
        res["stream"][f"c{c}"] = s
        log(f"    stream c{c} x {messages}: {s['messages_per_s']:.0f} messages/s, "
            f"first message p50 {s['ttfm_p50_ms']:.3f} ms"
            + (f", {s['errors']} errors ({s['first_error']})" if s["errors"] else ""))
    return res
