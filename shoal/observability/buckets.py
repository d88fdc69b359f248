"""Histogram bucket boundaries, the one definition every histogram in shoal uses.

Kept free of imports: ``shoal.runtime.wire`` (imported by every replica) re-exports
``LATENCY_BUCKETS_MS``, and replicas' latency histograms (``shoal status`` percentiles) and the
Prometheus page's latency histograms must agree bucket for bucket.
"""

from __future__ import annotations

__all__ = ["BATCH_SIZE_BUCKETS", "BATCH_UTILIZATION_BUCKETS", "LATENCY_BUCKETS_MS", "MODEL_LOAD_BUCKETS_MS"]

# Upper bounds (ms); the last bucket of a histogram is open (+Inf). Ray Serve's default
# boundaries with three sub-millisecond ones added in front: most shoal hops take well under a
# millisecond.
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000,
                                         5000, 10000, 60000, 120000, 300000, 600000)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_UTILIZATION_BUCKETS: tuple[float, ...] = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100)
MODEL_LOAD_BUCKETS_MS: tuple[float, ...] = (1, 5, 10, 50, 100, 500, 1000, 5000, 10000, 30000, 60000, 120000, 300000)
