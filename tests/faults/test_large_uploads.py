"""Issue 15: large uploads hold about their own size in the proxy, within the front's
request-body budget; a body that finds no room in time gets 503, one that could never fit 413.

Large bodies wait for a replica slot before they are read (admission before buffering), are
read into one buffer of their declared size, and travel to the replica without being copied
into a pickle (shoal.runtime.wire.FramedProtocol.send_oob).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
from conftest import Instance, wait_until
from loadgen import Load, proxy_pid, report, rss_bytes, running

from shoal import serve

MIB = 1024 * 1024
SIZE = 95 * MIB
UPLOADS = 4
BLOCK = bytes(range(256)) * 4096  # 1 MiB


@serve.deployment(max_ongoing_requests=16)
class Sink:
    def __init__(self) -> None:
        self.large = 0  # large bodies received

    async def __call__(self, request: Any) -> dict[str, Any]:
        import asyncio

        body = await request.body()
        self.large += len(body) >= MIB
        hold = float(request.query_params.get("hold", "0"))
        if hold:
            await asyncio.sleep(hold)
        return {"n": len(body), "sha": hashlib.sha256(body).hexdigest()}

    def received(self) -> int:
        return self.large


def _body(size: int) -> Iterator[bytes]:
    left = size
    while left:
        n = min(left, len(BLOCK))
        yield BLOCK[:n]
        left -= n


def _sha(size: int) -> str:
    h = hashlib.sha256()
    for chunk in _body(size):
        h.update(chunk)
    return h.hexdigest()


class PeakRSS:
    """The highest RSS of a process while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _upload(url: str, size: int, out: list[Any]) -> None:
    try:
        r = httpx.post(url, content=_body(size), headers={"content-length": str(size)}, timeout=60)
        out.append((r.status_code, r.json()))
    except httpx.HTTPError as e:
        out.append(repr(e))


def _head_only(url: str, path: str, length: int) -> tuple[int, dict[str, str], float]:
    """Send a request head declaring ``length`` body bytes and none of them: the answer's
    status, headers and how long it took."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split()[1]), headers, time.monotonic() - t0


def _small_ok(r: httpx.Response) -> bool:
    return r.status_code == 200 and r.json()["n"] == 5


def test_four_large_uploads_hold_about_their_size_in_the_proxy(proxied: Instance) -> None:
    serve.run(Sink.bind())
    url = proxied.url + "/"
    assert httpx.post(url, content=b"warm!", timeout=10).json()["n"] == 5
    expected = _sha(SIZE)
    results: list[Any] = []
    load = Load(url, clients=2, method="POST", body=b"small", ok=_small_ok)
    with running(load), PeakRSS(proxy_pid()) as rss:
        assert load.wait_ok(5, timeout=20)
        load.mark()
        threads = [threading.Thread(target=_upload, args=(url, SIZE, results)) for _ in range(UPLOADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert load.wait_ok(10, timeout=20)
        counts = load.stop()
        recovery = load.recovery()
    print(f"proxy RSS: base {rss.base >> 20} MiB, peak {rss.peak >> 20} MiB, growth {rss.growth >> 20} MiB "
          f"for {UPLOADS} x {SIZE >> 20} MiB uploads")
    report(f"{UPLOADS} concurrent {SIZE >> 20} MB uploads", counts, 0.0 if recovery is None else recovery[0],
           "answered; proxy holds ~1x the bodies", f"proxy RSS +{rss.growth >> 20} MiB")
    assert results == [(200, {"n": SIZE, "sha": expected})] * UPLOADS, results
    assert counts.hung == 0 and counts.failed == 0, counts
    admitted = UPLOADS * SIZE
    assert rss.growth < 1.3 * admitted, f"the proxy grew by {rss.growth >> 20} MiB"
    assert rss.growth < 512 * MIB  # the default budget


def test_a_body_with_no_room_in_the_budget_gets_503_after_its_wait(run_dir: str) -> None:
    from conftest import child_pids

    before = child_pids()
    budget = 150 * MIB
    serve.start(http_options={"port": 0, "ingress_serves_http": False, "request_body_budget_bytes": budget,
                              "request_body_budget_wait_s": 1.0}, _run_dir=run_dir)
    try:
        handle = serve.run(Sink.bind())
        url = serve.http_address()
        assert httpx.post(url + "/", content=b"warm!", timeout=10).json()["n"] == 5
        held: list[Any] = []
        load = Load(url + "/", clients=2, method="POST", body=b"small", ok=_small_ok)
        with running(load):
            assert load.wait_ok(5, timeout=20)
            load.mark()
            # One upload takes 95 of the 150 MiB and is held by its replica for a while.
            first = threading.Thread(target=_upload, args=(url + "/?hold=6", SIZE, held))
            first.start()
            assert wait_until(lambda: handle.received.remote().result() >= 1, 20)
            # Another finds no room: 503 with Retry-After once its wait is over, its body unread.
            status, headers, took = _head_only(url, "/", SIZE)
            assert status == 503 and headers.get("retry-after") == "1", (status, headers)
            assert took < 10, took  # a bounded wait, not a hang
            # One larger than the whole budget could never fit: 413 at once.
            assert _head_only(url, "/", budget + 1)[0] == 413
            first.join(30)
            assert held == [(200, {"n": SIZE, "sha": _sha(SIZE)})], held
            # With the room back, the next one goes through.
            again: list[Any] = []
            _upload(url + "/", SIZE, again)
            assert again and again[0][0] == 200, again
            counts = load.stop()
            recovery = load.recovery()
        report("upload over the body budget", counts, 0.0 if recovery is None else recovery[0],
               "503 + Retry-After after a bounded wait", f"waited {took:.1f} s")
        assert counts.hung == 0 and counts.failed == 0, counts
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"
