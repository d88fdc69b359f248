"""Issue 15: clients that ask for a huge streamed response and never read it.

Each such stream is held back by its own credit window (shoal.runtime.flow): the replica stops
producing about a window ahead of what the proxy wrote to the client, so the proxy's memory
stays bounded, other clients are served on the same replica and the proxy stays healthy.
When those clients go away their requests are cancelled on the replica and the slots freed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from conftest import Instance, wait_until
from loadgen import Load, proxy_pid, report, rss_bytes, running

from shoal import serve

CHUNK = 64 * 1024
HUGE = 200 * 1024 * 1024
NON_READERS = 5
# What the proxy may grow by while the non-readers hold their streams (each is held to about
# a window in the proxy, plus socket buffers; without flow control it took ~1 GB in 3 s).
RSS_BOUND = 150 * 1024 * 1024


@serve.deployment(max_ongoing_requests=32)
class Blob:
    def __init__(self) -> None:
        self.sent = 0  # bytes yielded by the huge streams
        self.streams = 0  # huge streams running now

    async def __call__(self, request: Any) -> AsyncIterator[bytes]:
        size = int(request.query_params.get("size", "100"))
        huge = size >= HUGE
        block = b"x" * CHUNK
        self.streams += huge
        try:
            while size > 0:
                n = min(size, CHUNK)
                yield block[:n]
                self.sent += n * huge
                size -= n
        finally:
            self.streams -= huge

    def progress(self) -> tuple[int, int]:
        return self.sent, self.streams


def _non_reader(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(f"GET /?size={HUGE} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return s


def test_clients_that_never_read_hold_back_only_their_own_streams(proxied: Instance) -> None:
    handle = serve.run(Blob.bind())
    url = proxied.url
    assert httpx.get(url + "/?size=10", timeout=10).content == b"x" * 10
    pid = proxy_pid()
    base = rss_bytes(pid)
    peak = [base]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load = Load(url + "/?size=100000", clients=2, ok=lambda r: r.status_code == 200 and len(r.content) == 100000)
    sockets: list[socket.socket] = []
    try:
        with running(load):
            assert load.wait_ok(5, timeout=20)
            load.mark()
            sockets = [_non_reader(url) for _ in range(NON_READERS)]
            assert wait_until(lambda: handle.progress.remote().result()[1] >= NON_READERS, 20)

            # The producers stop: nothing more is yielded for a while although nobody finished.
            def stalled() -> bool:
                before = handle.progress.remote().result()[0]
                time.sleep(1.0)
                return handle.progress.remote().result()[0] == before

            healthz_ok = 0
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                healthz_ok += httpx.get(url + "/-/healthz", timeout=5).status_code == 200
                if load.counts().ok >= 20 and stalled():
                    break
            sent, streams = handle.progress.remote().result()
            assert streams >= NON_READERS, (sent, streams)
            assert sent < NON_READERS * HUGE // 4, f"the producers did not stop: {sent} bytes sent"
            assert healthz_ok >= 1
            assert load.wait_ok(20, timeout=20)  # other clients keep being answered
            counts = load.stop()
            recovery = load.recovery()
    finally:
        sampling.set()
        sampler.join()
        for s in sockets:
            s.close()
    growth = peak[0] - base
    print(f"proxy RSS: base {base >> 20} MiB, peak {peak[0] >> 20} MiB, growth {growth >> 20} MiB; "
          f"{sent >> 20} MiB produced for {NON_READERS} non-reading clients")
    report(f"{NON_READERS} clients never read a 200 MB stream", counts, 0.0 if recovery is None else recovery[0],
           "others served, proxy RSS bounded", f"proxy RSS +{growth >> 20} MiB")
    assert counts.hung == 0 and counts.failed == 0, counts
    assert growth < RSS_BOUND, f"the proxy grew by {growth >> 20} MiB"
    # The clients went away: their requests are cancelled on the replica, the slots freed.
    assert wait_until(lambda: handle.progress.remote().result()[1] == 0, 15), handle.progress.remote().result()
    assert httpx.get(url + "/?size=10", timeout=10).content == b"x" * 10
