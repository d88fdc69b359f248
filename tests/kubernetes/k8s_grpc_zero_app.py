"""A gRPC app whose ingress scales to zero, for the holding-front test (test_sim_grpc_zero.py).

``Hold`` answers the ``Echo`` service of :data:`k8s_grpc_app.PROTO` (``Say`` only) with its pod's
name; it has ``min_replicas: 0`` and short autoscaling delays. Its constructor fails while the file
named by ``$GRPC_ZERO_FAIL_FILE`` exists, so that a test can make the ingress unable to start.
"""

from __future__ import annotations

import os
from typing import Any

from k8s_grpc_app import pb

from shoal import serve

QUICK = {"metrics_interval_s": 0.2, "look_back_period_s": 1.0, "upscale_delay_s": 0.5,
         "downscale_delay_s": 1.0, "downscale_to_zero_delay_s": 1.0}


@serve.deployment(max_ongoing_requests=8, health_check_period_s=0.2, graceful_shutdown_timeout_s=5,
                  autoscaling_config={"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 4, **QUICK})
class Hold:
    def __init__(self) -> None:
        fail = os.environ.get("GRPC_ZERO_FAIL_FILE", "")
        if fail and os.path.exists(fail):
            raise RuntimeError(f"told to fail ({fail} exists)")

    def Say(self, request: Any) -> Any:
        return pb().EchoReply(text=f"hello {request.text}", app=serve.get_replica_context().app_name,
                              pod=os.environ.get("SHOAL_POD_NAME", ""))

    async def __call__(self, request: Any) -> str:
        return "http ok"


app = Hold.bind()
