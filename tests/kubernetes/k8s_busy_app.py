"""A one-deployment app for the pod port tests: a method that blocks the replica's event loop
(a synchronous call inside ``async def``, the mistake user code makes), to check that the
pod's probes are answered while the loop is busy."""

from __future__ import annotations

import time

from shoal import serve


@serve.deployment(max_ongoing_requests=4, health_check_period_s=0.5, graceful_shutdown_timeout_s=5)
class Busy:
    async def __call__(self, x: str) -> str:
        return f"busy:{x}"

    async def block(self, seconds: float) -> str:
        time.sleep(seconds)  # blocks the event loop, on purpose
        return f"blocked {seconds}"


app = Busy.bind()
