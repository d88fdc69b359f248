"""``shoal replica`` in (simulated) pods: RPC handshake and admission, probes, metrics, callers
holding requests for a deployment with no pods, and the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_sim_support import RpcClient, admin, build_objects, metric, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes import pod as pod_mod
from shoal.kubernetes.pod import FileResolver, PodBackend, needs_loopback
from shoal.runtime.wire import (
    END,
    ERR,
    ITEM,
    OK,
    REJECT,
    AuthError,
    FramedProtocol,
    RequestMeta,
    connect_tcp,
    serve_tcp,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "pipe"
ONLY_B = {"pipe-ingress": 0, "pipe-a": 0, "pipe-b": 1}


def _secret(sim: object) -> bytes:
    return sim.secret_value(names.secret_name(APP), names.SECRET_KEY).encode()  # type: ignore[attr-defined]


def test_rpc_handshake_admission_and_metrics(tmp_path: Path) -> None:
    with running(build_objects(tmp_path), replicas=ONLY_B) as sim:
        pod = sim.pods_of("pipe-b")[0]
        secret = _secret(sim)

        async def go() -> None:
            # A wrong secret never gets through the handshake.
            with pytest.raises((AuthError, ConnectionError)):
                await connect_tcp(pod.ip, names.RPC_PORT, b"not the secret", timeout=5)
            # An unauthenticated peer announcing a huge frame is cut off at once, unread (inside TLS).
            reader, writer = await asyncio.open_connection(pod.ip, names.RPC_PORT, ssl=sim.client_tls())
            await reader.readexactly(4 + 32)  # the server's hello: its nonce and its secret's id
            writer.write(struct.pack(">I", 1 << 30) + b"x" * 1024)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

            c = await RpcClient().connect(pod.ip, names.RPC_PORT, secret)
            reply = await c.reply(c.send("__call__", "hi"))
            assert reply[0] == OK and reply[2]["x"] == "hi" and reply[2]["b"] == pod.name
            rid = c.send("count", 3, stream=True)
            assert (await c.reply(rid))[0] == END
            assert [m[2] for m in c.messages[rid] if m[0] == ITEM] == [0, 1, 2]
            err = await c.reply(c.send("no_such_method"))
            assert err[0] == ERR
            # max_ongoing_requests=4: a fifth concurrent request is refused (its caller goes elsewhere).
            # (A slot is freed just after its reply is sent: start from an idle replica.)
            assert await asyncio.to_thread(
                wait_for, lambda: metric(pod, names.METRIC_ONGOING, app=APP, deployment="B") == 0, 5)
            rids = [c.send("slow", 0.6) for _ in range(5)]
            assert await asyncio.to_thread(
                wait_for, lambda: metric(pod, names.METRIC_ONGOING, app=APP, deployment="B") == 4, 5)
            kinds = sorted([(await c.reply(r))[0] for r in rids])
            assert kinds == [OK] * 4 + [REJECT]
            c.close()

        asyncio.run(go())
        m = {k: metric(pod, k + "_total", app=APP, deployment="B")
             for k in (pod_mod.METRIC_REQUESTS, pod_mod.METRIC_ERRORS, pod_mod.METRIC_REJECTED)}
        print("counters:", m)
        assert m[pod_mod.METRIC_REQUESTS] == 7  # call, stream, the failed call, four slow ones
        assert m[pod_mod.METRIC_ERRORS] == 1
        assert m[pod_mod.METRIC_REJECTED] == 1
        assert metric(pod, names.METRIC_ONGOING, app=APP, deployment="B") == 0
        assert metric(pod, pod_mod.METRIC_READY, app=APP, deployment="B") == 1


def test_ready_follows_check_health_and_liveness_fails_after_three_in_a_row(tmp_path: Path) -> None:
    sick = tmp_path / "sick"
    # Checks 2 s apart: the test recovers B well before a third failure in a row.
    objects = build_objects(tmp_path, deployments=[{"name": "B", "user_config": {"unhealthy_file": str(sick)},
                                                    "health_check_period_s": 2}])
    with running(objects, replicas=ONLY_B) as sim:
        pod = sim.pods_of("pipe-b")[0]
        dns = names.service_dns(APP, "B", sim.namespace)
        assert admin(pod, "/-/ready")[0] == 200
        assert sim.resolver_records()[dns] == [pod.ip]
        sick.touch()
        assert wait_for(lambda: admin(pod, "/-/ready")[0] == 503)
        body = admin(pod, "/-/ready")[1]
        assert b"told to be unhealthy" in body
        assert admin(pod, "/-/healthz")[0] == 200  # alive, just not ready
        assert wait_for(lambda: sim.resolver_records()[dns] == [])  # out of the Service's endpoints
        assert metric(pod, pod_mod.METRIC_READY, app=APP, deployment="B") == 0
        sick.unlink()
        assert wait_for(lambda: admin(pod, "/-/ready")[0] == 200)
        assert wait_for(lambda: sim.resolver_records()[dns] == [pod.ip])
        assert pod.restarts == 0
        # Three failures in a row (Ray's threshold): the liveness endpoint fails for good, so the
        # kubelet (the simulation's runs the livenessProbe) restarts the container, as Ray Serve
        # replaces such a replica: a wedged replica gives its GPU back.
        pid = pod.pid
        sick.touch()
        assert wait_for(lambda: pod.restarts == 1 or admin(pod, "/-/healthz")[0] == 503, 30)
        if pod.restarts == 0:
            assert b"check_health failed 3 times in a row" in admin(pod, "/-/healthz")[1]
        sick.unlink()  # the fresh container's check passes again
        assert wait_for(lambda: pod.restarts == 1 and pod.ready, 60), sim.describe()
        assert pod.pid != pid and pod.exit_codes == [-9]
        assert "livenessProbe failed 3 times in a row" in pod.log_path.read_text()
        assert admin(pod, "/-/healthz")[0] == 200 and admin(pod, "/-/ready")[0] == 200


def test_caller_holds_requests_while_callee_has_no_pods(tmp_path: Path) -> None:
    with running(build_objects(tmp_path), replicas={"pipe-ingress": 0, "pipe-a": 1, "pipe-b": 0}) as sim:
        a = sim.pods_of("pipe-a")[0]
        secret = _secret(sim)

        async def go() -> None:
            c = await RpcClient().connect(a.ip, names.RPC_PORT, secret)
            rid = c.send("__call__", "wake")
            # A holds the request and says so: what lets KEDA scale B up from zero.
            assert await asyncio.to_thread(
                wait_for, lambda: metric(a, names.METRIC_CALLER_QUEUED, app=APP, deployment="B") == 1, 10)
            assert rid not in c.messages
            await asyncio.to_thread(sim.scale, "pipe-b", 1)
            reply = await c.reply(rid, timeout=20)
            assert reply[0] == OK and reply[2]["x"] == "wake" and reply[2]["a"] == a.name
            assert metric(a, names.METRIC_CALLER_QUEUED, app=APP, deployment="B") == 0
            c.close()

        asyncio.run(go())


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    with running(build_objects(tmp_path), replicas=ONLY_B, prestop_max_s=0.0) as sim:
        pod = sim.pods_of("pipe-b")[0]
        secret = _secret(sim)

        async def go() -> None:
            c = await RpcClient().connect(pod.ip, names.RPC_PORT, secret)
            rids = [c.send("slow", 1.5) for _ in range(3)]
            assert await asyncio.to_thread(
                wait_for, lambda: metric(pod, names.METRIC_ONGOING, app=APP, deployment="B") == 3, 5)
            await asyncio.to_thread(sim.scale, "pipe-b", 0, wait=False)  # SIGTERM (no preStop delay)
            assert await asyncio.to_thread(wait_for, lambda: admin(pod, "/-/ready") == (503, b"draining\n"), 5)
            # New work is refused: on the open connection, and as new connections.
            assert (await c.reply(c.send("__call__", "late")))[0] == REJECT
            with pytest.raises(OSError):
                await connect_tcp(pod.ip, names.RPC_PORT, secret, timeout=5)
            # The requests in flight finish.
            for rid in rids:
                reply = await c.reply(rid)
                assert reply[0] == OK and reply[2] == "slept 1.5"
            await asyncio.wait_for(c.closed.wait(), 15)

        asyncio.run(go())
        sim.wait_gone(30)
        assert pod.exit_codes == [0]
        assert "drained; exiting" in pod.logs()


def test_cli_errors_and_help(tmp_path: Path) -> None:
    objects = build_objects(tmp_path)
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"][names.CONFIG_FILE_NAME]
    path = tmp_path / "serve.yaml"
    path.write_text(config)
    shoal = str(Path(sys.executable).parent / "shoal")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).parent), names.ENV_CONFIG: str(path),
           names.ENV_APP: APP, names.ENV_POD_IP: f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.9"}
    no_secret = subprocess.run([shoal, "replica", "--deployment", "B"], env=env, capture_output=True, text=True,
                               timeout=30)
    assert no_secret.returncode == 2 and "SHOAL_RPC_SECRET is not set" in no_secret.stderr
    env[names.ENV_SECRET] = "s3cret"
    env[names.ENV_INSECURE_NO_TLS] = "1"  # missing TLS files are refused before the config is read (test_pod_tls)
    wrong = subprocess.run([shoal, "replica", "--deployment", "Nope"], env=env, capture_output=True, text=True,
                           timeout=30)
    assert wrong.returncode == 2, wrong.stderr
    assert "has no deployment 'Nope' (it has: Ingress, A, B)" in wrong.stderr
    assert len([line for line in wrong.stderr.splitlines() if "ERROR" in line]) == 1  # one line per record
    helped = subprocess.run([shoal, "replica", "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0
    for word in ("--deployment", "SHOAL_RPC_SECRET", "/-/ready", "SIGTERM"):
        assert word in helped.stdout


async def test_pod_backend_follows_dns_with_back_off(tmp_path: Path) -> None:
    """In-process: the router's pods come from the resolver file; a failed pod is retried later."""
    secret = os.urandom(32)
    ip = f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    with socket.socket() as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    conns: list[FramedProtocol] = []

    def on_connect(proto: FramedProtocol) -> None:
        conns.append(proto)
        proto.on_message = lambda p, m: p.send_user((OK, m[1], ("echo", m[3][0])))

    dns = names.service_dns("app", "dep", "ns")
    resolver = tmp_path / "resolver.json"
    resolver.write_text(json.dumps({dns: [ip]}))
    server = await serve_tcp(ip, port, secret, on_connect)
    backend = PodBackend(asyncio.get_running_loop(), secret, "ns", "cluster.local", FileResolver(str(resolver)),
                         rpc_port=port, backoff_s=(0.3, 10.0))
    router = backend.router("app", "dep")
    try:
        assert await router.call("__call__", ("one",), {}, RequestMeta("1")) == ("echo", "one")
        # The pod goes away while DNS still lists it: dropped, then retried after the back-off.
        server.close()
        for c in conns:
            c.close()
        await asyncio.sleep(0.1)
        assert router.num_replicas == 0
        server = await serve_tcp(ip, port, secret, on_connect)
        assert await asyncio.wait_for(router.call("__call__", ("two",), {}, RequestMeta("2")), 5) == ("echo", "two")
        # No pods at all: callers wait (and are counted) until one appears.
        resolver.write_text(json.dumps({dns: []}))
        for c in conns:
            c.close()
        await asyncio.sleep(0.5)
        call = asyncio.ensure_future(router.call("__call__", ("three",), {}, RequestMeta("3")))
        await asyncio.sleep(0.3)
        assert not call.done() and router.num_queued == 1
        resolver.write_text(json.dumps({dns: [ip]}))
        assert await asyncio.wait_for(call, 5) == ("echo", "three")
    finally:
        backend.close()
        server.close()


def test_pods_also_listen_on_loopback_only_in_a_cluster() -> None:
    # kubectl port-forward connects to the pod's 127.0.0.1; simulated pods are loopback addresses.
    assert needs_loopback("10.244.1.7") and needs_loopback("fd00::7")
    assert not needs_loopback("127.31.0.4") and not needs_loopback("0.0.0.0") and not needs_loopback("::1")


async def test_tcp_addresses_and_silent_peers() -> None:
    from shoal.runtime.wire import join_host_port, split_host_port

    assert split_host_port("10.1.2.3:9000") == ("10.1.2.3", 9000)
    assert split_host_port("[fd00::7]:9000") == ("fd00::7", 9000)
    assert join_host_port("fd00::7", 9000) == "[fd00::7]:9000"
    assert split_host_port("/tmp/shoal-1/r.sock") is None and split_host_port("relative.sock") is None
    # A peer that connects and never authenticates is dropped after the handshake timeout.
    ip = f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    server = await serve_tcp(ip, 0, os.urandom(32), lambda p: None, handshake_timeout=0.3)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(ip, port)
        assert len(await reader.readexactly(4 + 32)) == 36  # the server's nonce, then nothing
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        server.close()
