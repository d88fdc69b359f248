"""WebSockets through a (simulated) pod's HTTP front: the ingress pod routes the handshake and
runs the FastAPI WebSocket route itself, reached through the app's ingress Service."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from k8s_sim_support import build_objects, running
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from shoal.kubernetes import names

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "wsapp"


def test_websocket_echo_through_the_ingress_service(tmp_path: Path) -> None:
    objects = build_objects(tmp_path, app=APP, import_path="k8s_ws_app:app")
    with running(objects) as sim:
        url = "ws" + sim.http_url(names.ingress_service_name(APP))[len("http"):]
        pod = sim.pods_of(names.workload_name(APP, "WsEcho"))[0]
        with connect(url + "/echo", open_timeout=10, close_timeout=10) as ws:
            for i in range(20):
                ws.send(f"m{i}")
                assert ws.recv(timeout=10) == f"{pod.name}:m{i}"
        with pytest.raises(InvalidStatus) as refused:  # no websocket route there: Starlette's 403
            connect(url + "/nothing", open_timeout=10)
        assert refused.value.response.status_code == 403
