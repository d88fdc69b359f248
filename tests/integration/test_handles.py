"""Handle semantics, run against real replica processes and in _local_testing_mode alike."""

from __future__ import annotations

import asyncio
import os

import pytest
from conftest import deploy

from shoal import serve
from shoal.exceptions import RayServeException, RayTaskError, RequestCancelledError
from shoal.handle import DeploymentHandle, DeploymentResponse


@serve.deployment
class Adder:
    def __init__(self, amount: int) -> None:
        self.amount = amount

    def add(self, x: int) -> int:
        return x + self.amount

    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "finished"

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def whoami(self) -> dict[str, object]:
        ctx = serve.get_replica_context()
        return {"app": ctx.app_name, "deployment": ctx.deployment, "tag": ctx.replica_tag, "pid": os.getpid()}

    def __call__(self, x: int) -> int:
        return x * 100


@serve.deployment
class Pipeline:
    def __init__(self, first: DeploymentHandle, second: DeploymentHandle, extras: list[DeploymentHandle]) -> None:
        self.first = first
        self.second = second
        self.extras = extras

    async def __call__(self, x: int) -> int:
        # A response passed as an argument is resolved first (chaining without awaiting).
        return await self.second.add.remote(self.first.add.remote(x))

    async def fan_out(self, x: int) -> list[int]:
        return list(await asyncio.gather(*(h.add.remote(x) for h in self.extras)))

    def sync_call(self, x: int) -> int:
        # Sync methods run off the event loop, so blocking on a handle is fine here.
        return self.first.add.remote(x).result()


@serve.deployment
def doubler(x: int) -> int:
    return 2 * x


def build() -> serve.Application:
    return Pipeline.bind(Adder.bind(1), Adder.options(name="Adder2").bind(10), [doubler.bind()])


def test_compose_and_call_forms(mode: str) -> None:
    handle = deploy(Pipeline.bind(Adder.bind(1), Adder.options(name="Adder2").bind(10), []), mode)
    assert isinstance(handle, DeploymentHandle)
    assert handle.remote(5).result() == 16
    assert handle.sync_call.remote(1).result() == 2
    assert handle.options(method_name="sync_call").remote(2).result() == 3


def test_function_deployment_and_nested_handles(mode: str) -> None:
    handle = deploy(Pipeline.bind(Adder.bind(1), Adder.options(name="Adder2").bind(10), [doubler.bind()]), mode)
    # doubler's handle.add does not exist: the error names the method.
    with pytest.raises(AttributeError, match="add"):
        handle.fan_out.remote(3).result()
    fn = serve.get_deployment_handle("doubler", "default")
    assert fn.remote(21).result() == 42


async def test_await_from_async_code(mode: str) -> None:
    handle = deploy(Adder.bind(3), mode)
    assert await handle.add.remote(4) == 7
    results = await asyncio.gather(*(handle.add.remote(i) for i in range(20)))
    assert results == [i + 3 for i in range(20)]
    # A response can be awaited more than once.
    resp = handle.add.remote(1)
    assert await resp == 4
    assert await resp == 4


def test_remote_exception_keeps_type_and_traceback(mode: str) -> None:
    handle = deploy(Adder.bind(0), mode)
    with pytest.raises(ValueError) as info:
        handle.fail.remote("boom from the replica").result()
    err = info.value
    assert isinstance(err, RayTaskError)
    assert "boom from the replica" in str(err)
    assert "in fail" in str(err)  # the remote traceback names the failing method
    # The replica keeps serving after a user error.
    assert handle.add.remote(1).result() == 1


def test_unknown_method(mode: str) -> None:
    handle = deploy(Adder.bind(0), mode)
    with pytest.raises(AttributeError, match="no method 'nope'"):
        handle.nope.remote().result()


def test_replica_context_and_status(mode: str) -> None:
    handle = deploy(Adder.bind(0), mode, name="ctxapp", route_prefix="/ctx")
    info = handle.whoami.remote().result()
    assert info["app"] == "ctxapp" and info["deployment"] == "Adder"
    assert info["tag"]
    if mode == "process":
        assert info["pid"] != os.getpid()  # every replica is its own process
        st = serve.status()
        app = st.applications["ctxapp"]
        assert app.status == "RUNNING"
        assert app.deployments["Adder"].status == "HEALTHY"
        assert app.deployments["Adder"].replica_states == {"RUNNING": 1}
    else:
        assert info["pid"] == os.getpid()
    with pytest.raises(RayServeException):
        serve.get_replica_context()  # not inside a replica


def test_get_app_handle_and_delete(mode: str) -> None:
    deploy(Adder.bind(5), mode, name="a1", route_prefix="/a1")
    h = serve.get_app_handle("a1")
    assert h.add.remote(1).result() == 6
    with pytest.raises(RayServeException, match="does not exist"):
        serve.get_app_handle("missing")
    with pytest.raises(RayServeException, match="does not exist"):
        serve.get_deployment_handle("Nope", "a1")
    serve.delete("a1")
    if mode == "process":
        assert "a1" not in serve.status().applications
    with pytest.raises(RayServeException):
        h.add.remote(1).result(timeout_s=10)


def test_redeploy_replaces_app(mode: str) -> None:
    h = deploy(Adder.bind(1), mode)
    assert h.add.remote(1).result() == 2
    h2 = deploy(Adder.bind(100), mode)
    assert h2.add.remote(1).result() == 101
    # The old handle routes to the new version too: it names the deployment, not a replica.
    assert h.add.remote(1).result() == 101


def test_cancel(mode: str) -> None:
    h = deploy(Adder.bind(0), mode)
    resp = h.slow.remote(30)
    assert isinstance(resp, DeploymentResponse)
    resp.cancel()
    with pytest.raises(RequestCancelledError):
        resp.result(timeout_s=10)
    assert h.slow.remote(0).result(timeout_s=10) == "finished"


def test_result_timeout(mode: str) -> None:
    h = deploy(Adder.bind(0), mode)
    with pytest.raises(TimeoutError):
        h.slow.remote(5).result(timeout_s=0.2)


def test_user_config_applied_at_start(mode: str) -> None:
    @serve.deployment(user_config={"threshold": 7})
    class Configured:
        def __init__(self) -> None:
            self.threshold = 0

        def reconfigure(self, config: dict[str, int]) -> None:
            self.threshold = config["threshold"]

        def get(self) -> int:
            return self.threshold

    h = deploy(Configured.bind(), mode)
    assert h.get.remote().result() == 7


def test_class_defined_inside_a_test(mode: str) -> None:
    counter_start = 40

    @serve.deployment(num_replicas=2)
    class Local:
        def __init__(self) -> None:
            self.n = counter_start

        def next(self) -> int:
            self.n += 1
            return self.n

    h = deploy(Local.bind(), mode)
    values = [h.next.remote().result() for _ in range(6)]
    assert all(v > counter_start for v in values)


def test_streaming_handle(mode: str) -> None:
    @serve.deployment
    class Streamer:
        async def count(self, n: int):  # type: ignore[no-untyped-def]
            for i in range(n):
                yield i

        def sync_count(self, n: int):  # type: ignore[no-untyped-def]
            yield from range(n)

    h = deploy(Streamer.bind(), mode)
    assert list(h.options(stream=True).count.remote(5)) == [0, 1, 2, 3, 4]
    assert list(h.options(stream=True).sync_count.remote(3)) == [0, 1, 2]
    with pytest.raises(TypeError, match="stream=True"):
        h.count.remote(3).result()


def test_logging_config_json_to_file(instance: object, tmp_path: object) -> None:
    import json
    import logging
    from pathlib import Path

    logs = Path(str(tmp_path)) / "logs"

    @serve.deployment(logging_config={"encoding": "JSON", "log_level": "DEBUG", "logs_dir": str(logs)})
    class Chatty:
        def talk(self) -> str:
            logging.getLogger("my.model").debug("thinking hard")
            return "done"

    h = serve.run(Chatty.bind())
    assert h.talk.remote().result() == "done"
    files = list(logs.glob("replica_default_Chatty_*.log"))
    assert len(files) == 1
    lines = [json.loads(x) for x in files[0].read_text().splitlines()]
    record = next(x for x in lines if x["message"] == "thinking hard")
    assert record["levelname"] == "DEBUG" and record["deployment"] == "Chatty" and record["name"] == "my.model"


def test_user_config_change_applies_in_place(instance: object) -> None:
    @serve.deployment(user_config={"v": 1})
    class Live:
        def __init__(self) -> None:
            self.v = 0

        def reconfigure(self, config: dict[str, int]) -> None:
            self.v = config["v"]

        def get(self) -> tuple[int, int]:
            return self.v, os.getpid()

    h = serve.run(Live.bind())
    v, pid = h.get.remote().result()
    assert v == 1
    serve.run(Live.options(user_config={"v": 2}).bind())
    from conftest import wait_until

    assert wait_until(lambda: h.get.remote().result() == (2, pid), 10)  # same process, new config
