"""The pod runtime's side of gang replicas: ranks from the environment, rank 0 finding its ranks
and their readiness, refusing requests until the gang is assembled, and configuration errors."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from shoal.exceptions import RayServeException
from shoal.kubernetes import names
from shoal.kubernetes.gang_pod import GangLeader, Unassembled, ranks_from_env
from shoal.kubernetes.pod import AdminServer, PodConfigError, PodSettings, load_deployment, replica
from shoal.runtime.gang import GangPeers


def test_ranks_come_from_torch_variables() -> None:
    assert ranks_from_env({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4, "")
    assert ranks_from_env({"RANK": "0", "WORLD_SIZE": "2", names.ENV_GANG: "g"}) == (0, 2, "g")
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        ranks_from_env({"RANK": "$(LWS_WORKER_INDEX)", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        ranks_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=names.ENV_GANG):
        ranks_from_env({"RANK": "0", "WORLD_SIZE": "2"})


def test_the_cli_refuses_rank_from_env_without_ranks() -> None:
    result = CliRunner().invoke(replica, ["--deployment", "D", "--rank-from-env"],
                                env={names.ENV_SECRET: "s" * 32, "RANK": "", "WORLD_SIZE": ""})
    assert result.exit_code == 2 and "RANK and WORLD_SIZE" in result.output


class _Resolver:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}

    async def resolve(self, name: str) -> list[str] | None:
        return self.records.get(name, [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rank_0_is_ready_once_every_rank_is_and_refuses_requests_before() -> None:
    state = {"status": 503}
    admin = AdminServer(lambda method, path: (state["status"], "text/plain", b"starting\n"))
    port = _free_port()
    await admin.start("127.0.0.1", port)
    try:
        server = SimpleNamespace(gang=None)
        resolver = _Resolver()
        leader = GangLeader(server, pod_name="g-0", gang="g", namespace="ns", cluster_domain="cluster.local",
                            world_size=2, resolver=resolver, secret=b"s", max_ongoing=4, rpc_port=9000,
                            admin_port=port)
        assert leader.names == ["g-0-1.g.ns.svc.cluster.local"]
        assert isinstance(server.gang, Unassembled)
        with pytest.raises(RayServeException, match="not assembled"):
            await server.gang.run("f", (), {}, None, None)

        await leader.check()
        assert not leader.ready and "not in DNS" in leader.why
        resolver.records["g-0-1.g.ns.svc.cluster.local"] = ["127.0.0.1"]
        await leader.check()
        assert not leader.ready and "rank 1 is not ready: starting" in leader.why
        assert isinstance(server.gang, Unassembled) and "rank 1" in server.gang.why

        state["status"] = 200
        await leader.check()
        assert leader.ready and leader.why == ""
        peers: Any = server.gang
        assert isinstance(peers, GangPeers)
        assert [c.replica.endpoint for c in peers.conns] == ["127.0.0.1:9000"]
        await leader.check()
        assert server.gang is peers  # unchanged while the ranks are

        state["status"] = 503  # a rank turned unready: rank 0 with it (the links stay)
        await leader.check()
        assert not leader.ready and server.gang is peers
    finally:
        admin.close()


def test_a_pod_must_be_started_as_what_its_deployment_is(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [
        {"name": "g", "route_prefix": "/", "import_path": "tests.kubernetes.k8s_gang_app:app"}]}))
    settings = PodSettings(deployment="TPLinear", app=None, config_path=str(config), secret=b"s")
    with pytest.raises(PodConfigError, match=r"has 2 rank.*--rank-from-env"):
        load_deployment(settings)
    _, dspec, _, _ = load_deployment(PodSettings(deployment="TPLinear", app=None, config_path=str(config),
                                                 secret=b"s", rank=1, world_size=2))
    assert dspec.config.world_size == 2
    with pytest.raises(PodConfigError, match="one of 3"):
        load_deployment(PodSettings(deployment="TPLinear", app=None, config_path=str(config), secret=b"s",
                                    rank=1, world_size=3))
