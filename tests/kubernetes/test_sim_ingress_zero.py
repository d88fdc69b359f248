"""An HTTP ingress that scales to zero, end to end in the pod simulation, behind its holding front.

``shoal k8s build`` (``--ingress-at-zero front``, the default) keeps the ingress's ``min_replicas: 0``
and puts ``shoal front`` behind the app's HTTP Service. Through the real path (the front's held
requests -> demand to the scaler pod -> the ScaledObject's metrics-api URL -> the KEDA stand-in ->
the ingress Deployment), with the generated NetworkPolicies enforced on every connection:

* the app starts with no ingress pod; HTTP requests to the front are held, the ingress wakes, the
  held requests (a streaming one included) succeed; a WebSocket passes through the front;
* after idling the ingress goes back to zero, and a new request wakes it again;
* with the ingress unable to start (its constructor fails), a request gets 503 with
  ``Retry-After`` once the (shortened) wake deadline has passed: no request hangs.

Counts and outcomes are asserted, not latencies (these machines are noisy).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_sim_support import get, metric, running, wait_for

from shoal.kubernetes import names
from shoal.kubernetes.compiler import CompileOptions, compile_apps
from shoal.kubernetes.sim import PodSim
from shoal.kubernetes.targets import load_apps

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")

APP = "zero"
INGRESS = "Gate"
WAKE_S = 12.0  # the front's wake deadline here (waking Gate takes a few seconds in the simulation)


def compile_zero_app(tmp: Path, **opts: Any) -> list[dict[str, Any]]:
    config = {"applications": [{"name": APP, "route_prefix": "/", "import_path": "k8s_zero_app:app"}]}
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    apps, http_options = load_apps(str(path))
    options = CompileOptions(image="shoal:test", **opts)
    return compile_apps([(a.spec, a.entry) for a in apps], options, http_options=http_options).objects


@dataclasses.dataclass
class Answer:
    status: int = 0
    body: bytes = b""
    retry_after: str | None = None
    seconds: float = 0.0
    error: str = ""


def request(host: str, port: int, path: str, out: Answer, timeout: float = WAKE_S + 30) -> None:
    """One GET on its own connection; the client's timeout is far beyond the deadline, so a request
    the front failed to answer shows up as an error here."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        resp = conn.getresponse()
        out.status, out.retry_after = resp.status, resp.getheader("retry-after")
        out.body = resp.read()
    except Exception as e:  # recorded, asserted on by the caller
        out.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        out.seconds = time.monotonic() - t0


def concurrently(host: str, port: int, paths: list[str]) -> list[Answer]:
    answers = [Answer() for _ in paths]
    threads = [threading.Thread(target=request, args=(host, port, p, a), daemon=True)
               for p, a in zip(paths, answers, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAKE_S + 40)
    assert not any(t.is_alive() for t in threads), "a request hung past its client's timeout"
    return answers


def at_zero(sim: PodSim, workload: str) -> bool:
    """No pod of ``workload`` left, terminating ones included (one in its preStop still serves)."""
    return not [p for p in sim.pods_of(workload, include_terminating=True) if not p.gone]


def test_ingress_at_zero_is_held_woken_and_bounded(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    fail = tmp_path / "fail"
    # The simulation's KEDA stand-in reads the scaler without a TriggerAuthentication: no token here.
    objs = compile_zero_app(tmp_path, wake_timeout_s=WAKE_S, scaler_auth="none")
    ingress, front_wl = names.workload_name(APP, INGRESS), names.front_name(APP)
    # (Through the simulation's environment: a path under /tmp in the objects would be the pod's own /tmp.)
    with running(objs, replicas={ingress: 0}, env={"ZERO_FAIL_FILE": str(fail)}) as sim:
        assert not sim.pods_of(ingress)
        (front,) = sim.pods_of(front_wl, ready=True)
        sim.keda.start(polling_s=0.25, cooldown_s=0.5)
        host, port = sim.service_address(names.ingress_service_name(APP))
        assert sim.endpoints(names.ingress_service_name(APP)) == [f"{front.ip}:{names.HTTP_PORT}"]

        # 1. Held while the ingress is at zero, then answered once KEDA woke it.
        answers: list[Answer] = []
        runner = threading.Thread(target=lambda: answers.extend(concurrently(
            host, port, [f"/?q={i}" for i in range(4)] + ["/stream?n=5"])), daemon=True)
        runner.start()
        held = wait_for(lambda: (metric(front, names.METRIC_CALLER_QUEUED, app=APP, deployment=INGRESS) or 0) >= 1,
                        10, 0.02)
        runner.join(WAKE_S + 60)
        assert held, "the front never reported a held request"
        assert [a.status for a in answers] == [200] * 5, answers
        first_pods = {json.loads(a.body)["pod"] for a in answers[:4]}
        assert first_pods <= {p.name for p in sim.pods_of(ingress)}
        assert answers[4].body == b"".join(f"data: {i}\n\n".encode() for i in range(5))  # the stream, whole

        # 2. A WebSocket passes through the front to the (awake) ingress.
        from websockets.sync.client import connect

        with connect(f"ws://{host}:{port}/echo", open_timeout=15, close_timeout=10) as ws:
            for i in range(5):
                ws.send(f"m{i}")
                assert str(ws.recv(timeout=10)).endswith(f":m{i}")

        # 3. Idle: back to zero; a new request wakes it again.
        assert wait_for(lambda: at_zero(sim, ingress), 60, 0.1), sim.describe()
        (again,) = concurrently(host, port, ["/?q=again"])
        assert again.status == 200, again
        assert json.loads(again.body)["pod"] not in first_pods
        events = sim.keda.states[ingress].events
        print("keda stand-in:", [(a, b, why) for _, a, b, why in events])
        assert sum(1 for _, a, b, _why in events if a == 0 and b >= 1) >= 2  # woken twice from zero

        # 4. An ingress that cannot start: 503 with Retry-After after the deadline, not a hang.
        assert wait_for(lambda: at_zero(sim, ingress), 60, 0.1), sim.describe()
        fail.write_text("no")
        doomed: list[Answer] = []
        runner = threading.Thread(target=lambda: doomed.extend(concurrently(host, port, ["/?q=doomed"])), daemon=True)
        runner.start()
        # Meanwhile the scaler scrapes the front (its headless Service): the held request is the ingress's load.
        scaler_at = sim.service_address(names.scaler_name(APP))

        def scaler_sees_it() -> bool:
            status, body = get(*scaler_at, "/status")
            return status == 200 and json.loads(body)["deployments"][INGRESS]["queued_in_callers"] >= 1

        assert wait_for(scaler_sees_it, WAKE_S, 0.1), "the scaler never saw the request the front held"
        runner.join(WAKE_S + 60)
        (refused,) = doomed
        assert refused.status == 503 and refused.retry_after is not None, refused
        assert "wake deadline" in json.loads(refused.body).get("message", ""), refused
        assert refused.seconds >= WAKE_S - 1, refused
        assert (metric(front, names.METRIC_WAKE_TIMEOUTS + "_total", app=APP, deployment=INGRESS) or 0) >= 1
        fail.unlink()

        # The scaler heard the front's demand, and scraped the requests it held.
        status, body = get(*scaler_at, "/status")
        assert status == 200
        assert json.loads(body)["deployments"][INGRESS]["demands"] >= 2, body
        # Every connection the front made was allowed by the generated NetworkPolicies, and it did reach
        # the ingress pods' RPC port through them.
        assert sim.firewall.count("denied", src=front_wl) == 0
        assert sim.firewall.count("denied", dst=ingress) == 0
        assert sim.firewall.count("allowed", src=front_wl, dst=ingress, port=names.RPC_PORT) >= 2
