"""What every part of the benchmark runner shares: the checkout's paths, the frameworks, the settings, the log."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKLOADS = ("echo", "cores", "pipeline3", "handle", "payload", "stream", "batch", "coldstart", "memory", "grpc",
             "control")
FRAMEWORKS = ("shoal", "ray", "bare")


@dataclass(frozen=True)
class Settings:
    quick: bool
    duration_s: float  # one wrk measurement
    warmup_s: float  # a wrk run at the same concurrency, discarded, before each measurement
    echo_conns: tuple[int, ...] = (1, 8, 32, 100)
    pipeline_conns: tuple[int, ...] = (1, 8, 32)
    payload_conns: tuple[int, ...] = (1, 8)
    seq_requests: int = 500
    handle_calls: int = 500
    handle_callers: int = 64
    handle_seconds: float = 5.0
    batch_callers: int = 64
    batch_seconds: float = 5.0
    stream_clients: int = 16
    stream_tokens: int = 1000
    coldstart_runs: int = 3
    idle_s: float = 5.0
    # Idle memory again this long after start-up, when start-up transients are over (shoal
    # releases its spare replica process 30 s after the last replica start); 0 skips it.
    settle_s: float = 40.0
    grpc_callers: tuple[int, ...] = (1, 16)  # concurrent grpc.aio callers, unary and streaming alike
    grpc_stream_messages: int = 100  # replies per server-streaming call
    startup_timeout_s: float = 180.0

    @staticmethod
    def make(quick: bool) -> Settings:
        if not quick:
            return Settings(quick=False, duration_s=5.0, warmup_s=1.0)
        return Settings(quick=True, duration_s=2.0, warmup_s=0.5, handle_seconds=2.0, batch_seconds=2.0,
                        stream_tokens=200, coldstart_runs=1, settle_s=0.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]
