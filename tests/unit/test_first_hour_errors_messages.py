"""Issue 19, first hour: the messages a newcomer reads when something is wrong: a failed start
(and its race with the process's exit), a method missing on a handle, a handler that forgot
``await``. No processes: the controller's lifecycle runs with fake processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest

import shoal
from shoal.context import ReplicaContext
from shoal.runtime.callable import UserCallable, missing_method, to_response
from shoal.runtime.replica.tracebacks import failure_message
from shoal.runtime.wire import ReplicaFailed
from shoal.status import ReplicaState
from tests.unit.fixtures.fake_processes import FakeProc
from tests.unit.test_controller_flows import World, spec


def test_a_failed_start_stops_the_replica_and_keeps_the_error(tmp_path: Any) -> None:
    """The replica waits for the controller's Stop before exiting, so that its exit cannot
    overtake its report; the report's error is the deployment's message."""
    w = World(str(tmp_path))
    dep = w.deploy(spec())
    w.launcher.start_replica("shop", dep, serves_http=False)
    (rec,) = w.registry.of("shop", "Echo")
    w.lifecycle.failed(ReplicaFailed(rec.replica_id, "ValueError: no weights\nTraceback ...\n"))
    assert isinstance(rec.proc, FakeProc) and rec.proc.signals == [signal.SIGTERM]  # told to stop (not connected)
    # Stopping: no longer a start in progress (the status adds no "waiting for 1 replica" after the error).
    assert w.registry.replicas[rec.replica_id].state == ReplicaState.STOPPING
    rec.proc.code = 1
    w.lifecycle.reap(w.now)
    assert dep.failures == 1 and dep.message.startswith("replica constructor failed: ValueError: no weights")


def test_a_report_that_arrives_after_the_exit_still_wins(tmp_path: Any) -> None:
    """The race of issue 19 (1 run in 4): the exit is seen first; the error then replaces
    "exited with code 1" and the failure is not counted twice."""
    w = World(str(tmp_path))
    dep = w.deploy(spec())
    w.launcher.start_replica("shop", dep, serves_http=False)
    (rec,) = w.registry.of("shop", "Echo")
    assert isinstance(rec.proc, FakeProc)
    rec.proc.code = 1
    w.lifecycle.reap(w.now)
    assert dep.failures == 1 and "exited with code 1 before it was ready" in dep.message
    assert "shoal logs shop/Echo" in dep.message  # where its output is, e.g. after os._exit()
    w.lifecycle.failed(ReplicaFailed(rec.replica_id, "ValueError: no weights\n"))
    assert dep.failures == 1 and dep.message == "replica constructor failed: ValueError: no weights"


def _raise_in_user_code() -> None:
    raise KeyError("model.bin")


def test_a_failure_message_starts_with_the_error_and_the_users_frames() -> None:
    # As in a replica: the exception is caught in shoal's code, and shoal's frames lead to the user's.
    catcher = "def catch(fn, *args):\n    try:\n        fn(*args)\n    except Exception as e:\n        return e\n"
    namespace: dict[str, Any] = {}
    exec(compile(catcher, os.path.join(os.path.dirname(shoal.__file__), "runtime", "replica", "process.py"),
                 "exec"), namespace)
    error = namespace["catch"](UserCallable._in_context, _FakeUser(), _raise_in_user_code)
    text = failure_message(error)
    lines = text.splitlines()
    assert lines[0] == "KeyError: 'model.bin'"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[2].startswith(f'  File "{__file__}"')  # shoal's frame is left out
    assert "shoal/runtime/callable.py" not in text and 'raise KeyError("model.bin")' in text


class _FakeUser:
    _ctx = ReplicaContext("app", "Dep", "Dep-1")  # what UserCallable._in_context reads


class Model:
    def __call__(self, x: int) -> int:
        return x

    def predict(self, x: int) -> int:
        return x

    def preprocess(self, x: int) -> int:
        return x

    def _private(self) -> None:
        pass


def test_a_missing_method_lists_the_methods_that_exist() -> None:
    text = missing_method("Model", "predcit", Model())
    assert text == ("deployment 'Model' has no method 'predcit'; did you mean 'predict'? "
                    "Its methods: __call__, predict, preprocess.")
    user = UserCallable(Model, (), {}, is_function=False, context=ReplicaContext("app", "Model", "Model-1"))
    asyncio.run(user.initialize())
    with pytest.raises(AttributeError, match=r"no method 'nope'\. Its methods: __call__, predict, preprocess"):
        user._resolve("nope")


class _Pending:
    """Stands for a DeploymentResponse: awaitable, never encodable."""

    def __await__(self) -> Any:
        yield None


def test_a_forgotten_await_names_the_deployment() -> None:
    with pytest.raises(TypeError, match=r"deployment 'Ingress': .*\(_Pending\).*did you forget `await`\?"):
        to_response({"y": _Pending()}, "Ingress")
    assert json.loads(to_response({"y": 1}, "Ingress").body) == {"y": 1}
