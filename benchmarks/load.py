"""Load generators: wrk (parsed), sequential keep-alive GETs, concurrent token streams."""

from __future__ import annotations

import asyncio
import http.client
import re
import statistics
import subprocess
import time
from typing import Any

from benchmarks.common import Settings, log, percentile

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"requests": 0, "errors": 0, "non_2xx": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M):
            res[f"p{pct}_ms"] = _ms(m.group(1))
    if m := re.search(r"(\d+) requests in", out):
        res["requests"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        res["errors"] = sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["non_2xx"] = int(m.group(1))
    return res


def wrk(url: str, conns: int, seconds: float, script: str | None = None) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    res = parse_wrk(out)
    if "rps" not in res:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    return res


def wrk_series(url: str, conns: tuple[int, ...], cfg: Settings, script: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in conns:
        wrk(url, c, cfg.warmup_s, script)
        r = wrk(url, c, cfg.duration_s, script)
        bad = f", {r['errors']} socket errors, {r['non_2xx']} non-2xx" if r["errors"] or r["non_2xx"] else ""
        log(f"    c{c}: {r['rps']:.0f} req/s, p50 {r.get('p50_ms', float('nan')):.3f} ms{bad}")
        out[f"c{c}"] = r
    return out


def sequential_gets(port: int, path: str, n: int) -> dict[str, Any]:
    """``n`` back-to-back GETs over one keep-alive connection (Ray Serve's own latency microbenchmark)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(20):
            conn.request("GET", path)
            conn.getresponse().read()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            lat.append(time.perf_counter() - t)
            if resp.status != 200:
                raise RuntimeError(f"GET {path} -> {resp.status}")
    finally:
        conn.close()
    return {"n": n, "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3}


async def streams(url: str, clients: int, tokens: int) -> dict[str, Any]:
    import httpx

    ttft: list[float] = []
    counts: list[int] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=clients)) as c:
        async def one() -> None:
            t0 = time.perf_counter()
            first = None
            received = 0
            async with c.stream("GET", url, params={"n": tokens}) as r:
                r.raise_for_status()
                async for chunk in r.aiter_raw():
                    if first is None and chunk:
                        first = time.perf_counter() - t0
                    received += len(chunk)
            ttft.append(first if first is not None else float("nan"))
            counts.append(received // 8)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        wall = time.perf_counter() - t0
    total = sum(counts)
    ideal_wall = (tokens - 1) * 0.010
    return {"clients": clients, "tokens_per_stream": tokens, "tokens": total, "complete": total == clients * tokens,
            "wall_s": wall, "tokens_per_s": total / wall, "ideal_tokens_per_s": clients * tokens / ideal_wall,
            "ttft_p50_ms": percentile(ttft, 50) * 1e3, "ttft_max_ms": max(ttft) * 1e3}
