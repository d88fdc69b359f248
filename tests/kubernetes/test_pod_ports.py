"""A pod's ports under unauthenticated load: the probes keep answering while the RPC port is
flooded with connections that never authenticate and while the replica's event loop is busy;
the RPC port bounds the connections in handshake (before TLS); the admin port bounds a
request head in time and size, and its connections in number."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import resource
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from k8s_sim_support import RpcClient, build_objects, get, metric, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.certs import new_material
from shoal.kubernetes.pod import replica
from shoal.kubernetes.pod.admin import AdminAnswer, AdminHandler, AdminLimits, AdminServer
from shoal.kubernetes.pod.tls import PodTls
from shoal.kubernetes.sim import PodSim
from shoal.runtime import handshake_gate
from shoal.runtime.handshake_gate import METRIC_PENDING, METRIC_REFUSED, HandshakeCollector
from shoal.runtime.wire import OK, connect_tcp, serve_tcp

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "pipe"
ONLY_B = {"pipe-ingress": 0, "pipe-a": 0, "pipe-b": 1}
POD_FD_LIMIT = 1024
FLOOD = 2000  # sockets held open on the RPC port: half silent, half sending garbage
PROBE_TIMEOUT_S = 1.0  # kubelet's default timeoutSeconds


def _secret(sim: PodSim, app: str = APP) -> bytes:
    return sim.secret_value(names.secret_name(app), names.SECRET_KEY).encode()


@contextmanager
def pod_fd_limit(limit: int) -> Iterator[None]:
    """Processes started in the block (the pods) inherit this soft RLIMIT_NOFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, soft), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class RpcFlood:
    """Holds ``count`` connections to an RPC port that never authenticate: half send nothing,
    half send garbage; each one the server closes is opened again (after ``pause_s``)."""

    def __init__(self, host: str, port: int, count: int, pause_s: float = 0.3) -> None:
        self.host, self.port, self.count, self.pause_s = host, port, count, pause_s
        self.connects = 0
        self.open = 0
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True, name="rpc-flood")

    def __enter__(self) -> RpcFlood:
        self._thread.start()
        assert wait_for(lambda: self.connects >= self.count, 30), f"flood opened {self.connects}: {self.errors}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._one(i % 2 == 1)) for i in range(self.count)]
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, garbage: bool) -> None:
        while not self._stop.is_set():
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
                self.connects += 1
                self.open += 1
                try:
                    if garbage:
                        writer.write(b"\x00\x00\x00\x40" + os.urandom(64))  # a handshake frame, wrong
                    while await reader.read(4096):  # until the server closes it
                        pass
                finally:
                    self.open -= 1
            except (OSError, TimeoutError) as e:
                self.errors[type(e).__name__] += 1
            finally:
                if writer is not None:
                    writer.close()
            await asyncio.sleep(self.pause_s)


@contextmanager
def probing(host: str, port: int, paths: tuple[str, ...] = ("/-/healthz", "/-/ready")) -> Iterator[Counter[str]]:
    """Probes ``paths`` back to back (client timeout 1 s) until the block ends: the outcomes
    counted ("200", "503", or an exception's type)."""
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for path in paths:
                try:
                    status, _ = get(host, port, path, timeout=PROBE_TIMEOUT_S)
                    outcomes[f"{path} {status}"] += 1
                except Exception as e:
                    outcomes[f"{path} {type(e).__name__}"] += 1
            stop.wait(0.05)

    t = threading.Thread(target=run, daemon=True, name="prober")
    t.start()
    try:
        yield outcomes
    finally:
        stop.set()
        t.join(10)


def _failures(outcomes: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in outcomes.items() if not k.endswith(" 200")}


def _open_fds(pid: int | None) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def test_probes_answer_while_the_rpc_port_is_flooded(tmp_path: Path) -> None:
    # The pod gets the soft limit on open files a container commonly gets (1024: containerd 2,
    # and Python does not raise it); this process needs more for the flood.
    # (network_policies=False: the flood goes straight to the pod, not through the simulation's
    # NetworkPolicy relay, which would hold two more sockets per connection in this process.)
    with pod_fd_limit(POD_FD_LIMIT), running(build_objects(tmp_path), replicas=ONLY_B, network_policies=False) as sim:
        _raise_fd_limit(FLOOD + 1024)
        pod = sim.pods_of("pipe-b")[0]
        secret = _secret(sim)
        most_fds = 0

        def flooded_long_enough() -> bool:
            nonlocal most_fds
            most_fds = max(most_fds, _open_fds(pod.pid))
            # Long enough for the flood to go round several handshake timeouts.
            return sum(outcomes.values()) >= 200 and flood.connects >= 3 * FLOOD

        with RpcFlood(pod.ip, names.RPC_PORT, FLOOD) as flood, probing(pod.ip, pod.port("admin")) as outcomes:
            assert wait_for(flooded_long_enough, 90)
        print("flood:", flood.connects, "connects", dict(flood.errors), "probes:", dict(outcomes),
              "pod's most open files:", most_fds)
        assert _failures(outcomes) == {}, outcomes
        assert pod.restarts == 0
        # The pod held at most the bound of connections in handshake, and says how many it refused.
        assert most_fds < 64 + 200
        assert (metric(pod, METRIC_REFUSED + "_total") or 0) > 0
        assert (metric(pod, METRIC_PENDING) or 0) <= 64

        replies: list[tuple[object, ...]] = []

        def call() -> bool:
            async def go() -> None:
                c = await RpcClient().connect(pod.ip, names.RPC_PORT, secret)
                try:
                    replies.append(await c.reply(c.send("__call__", "after")))
                finally:
                    c.proto.close()

            try:
                asyncio.run(go())
            except (OSError, TimeoutError):
                return False  # its slot may not be free yet: the pod sees the flood's sockets close
            return True

        # Once the flood is gone, an authenticated caller gets through.
        assert wait_for(call, 20)
        assert replies[0][0] == OK and replies[0][2]["x"] == "after"  # type: ignore[index]


def test_probes_answer_while_the_event_loop_is_busy(tmp_path: Path) -> None:
    objects = build_objects(tmp_path, app="busy", import_path="k8s_busy_app:app")
    with running(objects, replicas={"busy-busy": 1}) as sim:
        pod = sim.pods_of("busy-busy")[0]

        async def block() -> tuple[object, ...]:
            c = await RpcClient().connect(pod.ip, names.RPC_PORT, _secret(sim, "busy"))
            try:
                return await c.reply(c.send("block", 4.0))
            finally:
                c.proto.close()

        with probing(pod.ip, pod.port("admin")) as outcomes:
            reply = asyncio.run(block())
        print("probes:", dict(outcomes))
        assert reply[0] == OK
        assert _failures(outcomes) == {}, outcomes


# -- the admin port, in-process ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def admin_server() -> Iterator[Callable[..., tuple[AdminServer, int]]]:
    """Start AdminServers (on their own threads) answering 200 on the probes; closed afterwards."""
    started: list[AdminServer] = []

    def start(handler: AdminHandler | None = None, **limits: Any) -> tuple[AdminServer, int]:
        server = AdminServer(handler or (lambda method, path: (200, "text/plain", b"ok\n")), AdminLimits(**limits))
        port = _free_port()
        asyncio.run(server.start("127.0.0.1", port))
        started.append(server)
        return server, port

    yield start
    for server in started:
        server.close()
        assert server._thread is not None and not server._thread.is_alive()


def _exchange(port: int, request: bytes, timeout: float = PROBE_TIMEOUT_S) -> bytes:
    """Send ``request`` raw and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_a_dribbled_head_is_cut_at_one_deadline(admin_server: Any) -> None:
    # Before: each header line had its own 10 s and a head 100 lines, so a client sending a line
    # every 9 s held a connection for 15 minutes. Now the whole head has one deadline.
    server, port = admin_server(head_timeout_s=0.5)
    lines = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /-/healthz HTTP/1.1\r\n")
        answer = b""
        sock.settimeout(0.1)  # one header line every 0.1 s, each well within any per-line limit
        while lines < 100:
            try:
                answer = sock.recv(4096)
                break  # the server answered (and closes)
            except TimeoutError:
                sock.sendall(f"X-Dribble-{lines}: x\r\n".encode())
                lines += 1
        sock.settimeout(5)
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"Connection: close" in answer
    assert lines < 100, "the connection outlived a hundred header lines"
    assert server.timed_out == 1


def test_admin_connections_are_capped(admin_server: Any) -> None:
    server, port = admin_server(max_connections=4, head_timeout_s=60)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        assert wait_for(lambda: server.connections == 4, 10)
        # A fifth is answered at once, without its request being read, and closed.
        answer = _exchange(port, b"GET /-/healthz HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"admin port busy\n"), answer
        assert b"Connection: close" in answer
        assert server.refused == 1
    finally:
        for sock in idle:
            sock.close()
    assert wait_for(lambda: server.connections == 0, 10)
    assert _exchange(port, b"GET /-/healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_admin_head_size_is_capped(admin_server: Any) -> None:
    _, port = admin_server(max_head_bytes=1024)
    big = b"GET /-/ready HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    answer = _exchange(port, big)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
    # Without an end: cut as soon as it is over the cap, not at the deadline.
    answer = _exchange(port, b"GET /-/ready HTTP/1.1\r\nX-Big: " + b"a" * 2000)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    fits = b"GET /-/ready HTTP/1.1\r\nX-Fits: " + b"a" * 900 + b"\r\n\r\n"
    assert _exchange(port, fits).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET /-/healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.30\r\n\r\n", 200),
    (b"GET /-/healthz?x=1 HTTP/1.0\n\n", 200),  # bare LF line ends are read too
    (b"HELLO\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    (b"GET /-/healthz HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET  /-/healthz HTTP/1.1\r\n\r\n", 400),
    (b"get /-/healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET -/healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /-/healthz HTTP/2.0\r\n\r\n", 400),
    (b"GET /-/healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /-/healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"POST /-/healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
])
def test_admin_request_line_is_strict(admin_server: Any, request_bytes: bytes, status: int) -> None:
    _, port = admin_server()
    answer = _exchange(port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert b"\r\nConnection: close\r\n" in answer
    if status == 405:
        assert b"\r\nAllow: GET, HEAD\r\n" in answer


def test_head_gets_no_body_and_a_future_answer_is_bounded(admin_server: Any) -> None:
    never: concurrent.futures.Future[AdminAnswer] = concurrent.futures.Future()

    def handler(method: str, path: str) -> AdminAnswer | concurrent.futures.Future[AdminAnswer]:
        if path == "/metrics":
            done: concurrent.futures.Future[AdminAnswer] = concurrent.futures.Future()
            done.set_result((200, "text/plain", b"metrics\n"))
            return done
        if path == "/stuck":
            return never
        return 200, "text/plain", b"ok\n"

    _, port = admin_server(handler, answer_timeout_s=0.3)
    answer = _exchange(port, b"HEAD /-/healthz HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n") and b"Content-Length: 3" in answer
    assert _exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nmetrics\n")
    answer = _exchange(port, b"GET /stuck HTTP/1.1\r\n\r\n", timeout=5)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"did not answer in time" in answer, answer
    assert never.cancelled()


def test_admin_limits_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="head_timeout_s"):
        AdminLimits(head_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        AdminLimits(max_connections=0)
    with pytest.raises(ValueError, match="max_head_bytes"):
        AdminLimits(max_head_bytes=10)


def test_probes_notice_a_stalled_loop() -> None:
    # The admin thread answers whatever the replica's loop does, so it watches that loop's
    # heartbeat: a loop that stopped turning for longer than loop_stall_s fails the probes.
    admin = AdminServer(lambda method, path: (200, "text/plain", b"ok\n"), AdminLimits(loop_stall_s=0.3))
    admin.heartbeat.interval_s = 0.05
    loop = asyncio.new_event_loop()
    release = threading.Event()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        loop.call_soon_threadsafe(admin.heartbeat.start, loop)
        assert wait_for(lambda: admin.heartbeat.last > 0 and admin.loop_stall() is None, 5)
        loop.call_soon_threadsafe(release.wait, 30)  # blocks the loop until released
        assert wait_for(lambda: admin.loop_stall() is not None, 10)
        assert "event loop stalled for" in (admin.loop_stall() or "")
        release.set()
        assert wait_for(lambda: admin.loop_stall() is None, 10)
    finally:
        release.set()
        loop.call_soon_threadsafe(admin.heartbeat.stop)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# -- the RPC port's handshake gate, in-process ------------------------------------------------


@pytest.fixture
def gate_settings() -> Iterator[None]:
    before = handshake_gate.settings()
    yield
    handshake_gate.configure(before.max_pending, before.timeout_s)


def _ip() -> str:
    return f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


def _tls(root: Path) -> PodTls:
    d = root / "app"
    d.mkdir()
    for key, value in new_material("app", "default").secret_data().items():
        (d / key).write_text(value)
    return PodTls(str(d), "app-rpc-tls")


@pytest.mark.parametrize("with_tls", [False, True], ids=["tcp", "tls"])
async def test_rpc_connections_in_handshake_are_capped(tmp_path: Path, gate_settings: None, with_tls: bool) -> None:
    handshake_gate.configure(max_pending=4, timeout_s=30)
    tls = _tls(tmp_path) if with_tls else None
    secret = os.urandom(32)
    ip = _ip()
    server = await serve_tcp(ip, 0, secret, lambda p: None, tls=tls.server if tls else None)
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    before = _refused_total()
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(4):  # silent: in handshake (TLS's or the HMAC one) until the timeout
            _, writer = await asyncio.open_connection(ip, port)
            held.append(writer)
        gate = next(g for g in list(handshake_gate._gates) if g.max_pending == 4 and g.pending)
        assert await asyncio.to_thread(wait_for, lambda: gate.pending == 4, 10)
        # A fifth is closed at once, before any TLS or hello: it reads nothing, then EOF.
        reader, writer = await asyncio.open_connection(ip, port)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        assert gate.refused >= 1 and _refused_total() > before
        # The held ones leave: their slots are free, and a caller with the secret gets in.
        for w in held:
            w.close()
        held.clear()
        assert await asyncio.to_thread(wait_for, lambda: gate.pending == 0, 10)
        proto = await connect_tcp(ip, port, secret, timeout=5, tls=tls.client if tls else None)
        proto.close()
    finally:
        for w in held:
            w.close()
        server.close()


def _refused_total() -> float:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HandshakeCollector())
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == METRIC_REFUSED + "_total":
                return float(sample.value)
    raise AssertionError("no refused counter")


def test_gate_settings_name_the_option() -> None:
    with pytest.raises(ValueError, match="--rpc-max-handshakes"):
        handshake_gate.GateSettings(max_pending=0)
    with pytest.raises(ValueError, match="--rpc-handshake-timeout"):
        handshake_gate.GateSettings(timeout_s=-1)
    assert handshake_gate.HandshakeGate(4, 3.0).handshake_timeout(10.0) == 3.0
    assert handshake_gate.HandshakeGate(4, None).handshake_timeout(10.0) == 10.0


def test_the_cli_refuses_bad_port_limits() -> None:
    for option, value in (("--rpc-max-handshakes", "0"), ("--admin-head-timeout", "0"),
                          ("--admin-max-connections", "0"), ("--loop-stall-timeout", "-1")):
        result = CliRunner().invoke(replica, ["--deployment", "D", option, value],
                                    env={names.ENV_SECRET: "s" * 32})
        assert result.exit_code == 2, (option, result.output)
        assert f"({option}) must be" in result.output, result.output
