"""Every exception class in ``shoal.exceptions`` is a ``RayServeException`` and pickles (errors
cross process boundaries: replica -> caller, controller -> CLI); the old import paths of the
classes that moved there still work."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest

import shoal.exceptions as exc_module
from shoal.exceptions import RayServeException, RayTaskError, wrap_remote_exception

# Constructor arguments of classes that take more than a message.
_ARGS: dict[str, tuple[Any, ...]] = {
    "BackPressureError": (3, 2),
    "RequestCancelledError": ("rid-1",),
    "ConfigError": ("serve.yaml", [("applications[0].name", "field required"), ("", "bad file")]),
}


def _classes() -> list[type[BaseException]]:
    return [obj for _, obj in inspect.getmembers(exc_module, inspect.isclass)
            if issubclass(obj, BaseException) and obj.__module__ == exc_module.__name__]


def _instance(cls: type[BaseException]) -> BaseException:
    if cls is RayTaskError:
        return wrap_remote_exception(ValueError("boom"), "Traceback: ...")
    return cls(*_ARGS.get(cls.__name__, ("something went wrong",)))


def test_the_module_has_the_moved_classes() -> None:
    names = {c.__name__ for c in _classes()}
    assert {"ConfigError", "PolicyLoadError", "CompileError", "ObjectInvalid", "SimError",
            "InstanceNotFoundError"} <= names


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_derives_from_ray_serve_exception(cls: type[BaseException]) -> None:
    assert issubclass(cls, RayServeException)


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_pickles_round_trip(cls: type[BaseException]) -> None:
    original = _instance(cls)
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is type(original)
    assert str(copy) == str(original)
    assert copy.args == original.args


def test_moved_classes_keep_their_builtin_bases_and_old_paths() -> None:
    from shoal.kubernetes.compiler import CompileError
    from shoal.kubernetes.sim import SimError
    from shoal.kubernetes.validate import ObjectInvalid
    from shoal.schema import ConfigError
    from shoal.serving.autoscaling import PolicyLoadError

    for cls in (ConfigError, PolicyLoadError, CompileError, ObjectInvalid):
        assert issubclass(cls, ValueError) and cls.__module__ == "shoal.exceptions"
    assert issubclass(SimError, RuntimeError)
    from shoal.runtime.client import ControllerError

    assert issubclass(ControllerError, RuntimeError) and ControllerError.__module__ == "shoal.exceptions"
    err = ConfigError("f.yaml", "broken")
    assert str(err) == "f.yaml: broken" and err.problems == [("", "broken")]


def test_module_docstring_and_all_list_every_class() -> None:
    names = {c.__name__ for c in _classes()}
    doc = exc_module.__doc__ or ""
    assert all(f" {name} " in doc or f" {name}\n" in doc for name in names), names
    assert exc_module.__all__ == sorted(exc_module.__all__)
    assert names <= set(exc_module.__all__)
