"""Helpers for the pod runtime and pod simulation tests: objects, HTTP, metrics, steady traffic."""

from __future__ import annotations

import http.client
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.sim import Pod, PodSim
from shoal.kubernetes.targets import load_apps

HERE = Path(__file__).resolve().parent
_serial = itertools.count()


def build_objects(tmp: Path, *, app: str = "pipe", deployments: list[dict[str, Any]] | None = None,
                  import_path: str = "k8s_pipeline_app:app", http_options: dict[str, Any] | None = None,
                  ) -> list[dict[str, Any]]:
    """What ``shoal k8s build serve.yaml`` writes for a config with these deployment overrides."""
    config: dict[str, Any] = {"applications": [{"name": app, "route_prefix": "/", "import_path": import_path,
                                                "deployments": deployments or []}]}
    if http_options:
        config["http_options"] = http_options
    path = tmp / f"serve-{next(_serial)}.yaml"
    path.write_text(yaml.safe_dump(config))
    apps, http = load_apps(str(path))
    result = compile_apps([(a.spec, a.entry) for a in apps], CompileOptions(image="shoal:test"), http_options=http)
    return result.objects


@contextmanager
def running(objects: list[dict[str, Any]], replicas: dict[str, int] | None = None, timeout: float = 60.0,
            **kwargs: Any) -> Iterator[PodSim]:
    """A started simulation, closed (every process stopped) whatever happens. Meanwhile this
    process's TCP connections use the pods' TLS certificate (like another pod of the app)."""
    from conftest import child_pids, wait_until

    from shoal.runtime.wire import TcpSecurity, set_tcp_security, tcp_security

    kwargs.setdefault("python_path", [str(HERE)])
    before = child_pids()
    sim = PodSim(objects, **kwargs)
    saved = tcp_security()
    set_tcp_security(TcpSecurity(client_tls=sim.client_tls()))
    try:
        try:
            sim.start(replicas=replicas, timeout=timeout)
        except Exception:
            print(sim.logs())
            raise
        yield sim
    except BaseException:
        print(sim.describe())
        print(sim.logs(15))
        raise
    finally:
        set_tcp_security(saved)
        sim.close()
        assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def get(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def admin(pod: Pod, path: str) -> tuple[int, bytes]:
    return get(pod.ip, pod.port("admin"), path, timeout=5.0)


def metrics(pod: Pod) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The pod's /metrics samples: {(name, sorted labels): value}."""
    status, body = admin(pod, "/metrics")
    assert status == 200, body
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(pod: Pod, name: str, **labels: str) -> float | None:
    return metrics(pod).get((name, tuple(sorted(labels.items()))))


def wait_for(cond: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


@dataclass
class Failure:
    what: str  # "HTTP 500", or an exception's type
    detail: str
    seconds: float


@dataclass
class Traffic:
    """Steady HTTP traffic from a few client threads, one connection per request."""

    host: str
    port: int
    threads: int = 4
    timeout: float = 10.0
    pause_s: float = 0.0  # between one thread's requests (to leave CPU for pods that start)
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True, name=f"traffic-{i}")
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(self.timeout + 5)

    def _run(self, i: int) -> None:
        n = 0
        while not self._stop.wait(self.pause_s if n else 0):
            n += 1
            t0 = time.monotonic()
            try:
                status, body = get(self.host, self.port, f"/?q={i}-{n}", timeout=self.timeout)
            except Exception as e:
                with self._lock:
                    self.failures.append(Failure(type(e).__name__, str(e), time.monotonic() - t0))
                continue
            with self._lock:
                if status == 200:
                    self.ok += 1
                    self.bodies.append(json.loads(body))
                else:
                    self.failures.append(Failure(f"HTTP {status}", body.decode(errors="replace")[:200],
                                                 time.monotonic() - t0))

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def wait_requests(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` more requests have finished."""
        start = self.total
        assert wait_for(lambda: self.total >= start + n, timeout), f"traffic stalled at {self.total} requests"

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for f in self.failures:
            kinds[f.what] = kinds.get(f.what, 0) + 1
        return f"{self.ok} ok, {len(self.failures)} failed {kinds or ''}"


class RpcClient:
    """A raw client of one pod's RPC port: send request tuples, await what comes back per id."""

    def __init__(self) -> None:
        import asyncio

        self.proto: Any = None
        self.messages: dict[int, list[tuple[Any, ...]]] = {}
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self._next = 0

    async def connect(self, host: str, port: int, secret: bytes) -> RpcClient:
        from shoal.runtime.wire import connect_tcp

        self.proto = await connect_tcp(host, port, secret, self._on_message, lambda p, e: self.closed.set(),
                                       timeout=5)
        return self

    def _on_message(self, proto: Any, msg: tuple[Any, ...]) -> None:
        self.messages.setdefault(msg[1], []).append(msg)
        self._changed.set()

    def send(self, method: str, *args: Any, stream: bool = False) -> int:
        from shoal.runtime.wire import REQUEST, RequestMeta

        self._next += 1
        self.proto.send_user((REQUEST, self._next, method, args, {}, RequestMeta(f"t-{self._next}", stream=stream)))
        return self._next

    async def reply(self, rid: int, timeout: float = 20.0) -> tuple[Any, ...]:
        """The final message of request ``rid`` (OK, ERR, REJECT or END)."""
        import asyncio

        from shoal.runtime.wire import ITEM

        async def final() -> tuple[Any, ...]:
            while True:
                msgs = self.messages.get(rid, [])
                if msgs and msgs[-1][0] != ITEM:
                    return msgs[-1]
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(final(), timeout)

    def close(self) -> None:
        if self.proto is not None:
            self.proto.close()
