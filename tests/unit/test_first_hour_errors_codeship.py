"""Issue 19, first hour: how deployment code travels to replicas (tracebacks keep the user's file
and line), its version hash, and the errors for things that cannot travel. No processes: the
pickles are loaded here, as a replica would."""

from __future__ import annotations

import importlib
import linecache
import sys
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from shoal import _codeship, serve
from shoal.deployment import build_app_spec
from shoal.exceptions import RayServeException

MODULE_V1 = '''from shoal import serve


def helper() -> int:
    return 1


@serve.deployment
class Model:
    def __init__(self, scale: int = 1) -> None:
        self.scale = scale

    def predict(self, x: int) -> int:
        return x * self.scale

    def broken(self) -> None:
        raise ValueError("broken in version one")


@serve.deployment
def plain(x: int) -> int:
    return x + helper()


app = Model.bind()
'''


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A module file of deployments on sys.path (as a user's app.py is), forgotten afterwards."""
    name = f"fh_app_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(MODULE_V1)
    sys.path.insert(0, str(tmp_path))
    try:
        yield name, path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        linecache.checkcache()
        _codeship._digests.clear()


def reimport(name: str) -> Any:
    """The module read again from its file (what ``--reload`` or a new process does)."""
    sys.modules.pop(name, None)
    _codeship._digests.clear()
    importlib.invalidate_caches()
    return importlib.import_module(name)


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def failure_text(fn: Any, *args: Any) -> str:
    try:
        fn(*args)
    except Exception:
        return traceback.format_exc()
    raise AssertionError("expected an exception")


def test_an_importable_deployment_class_travels_by_reference(user_module: tuple[str, Path]) -> None:
    name, path = user_module
    mod = importlib.import_module(name)
    dspec = build_app_spec(mod.Model.bind(3)).deployments["Model"]
    blob = dspec.serialized()
    assert b"<dynamic-code>" not in blob
    target, args, kwargs = cloudpickle.loads(blob)
    assert target is mod.Model.func_or_class  # the module's own class: its file's code
    assert target(*args, **kwargs).predict(2) == 6
    text = failure_text(target(*args, **kwargs).broken)
    assert f'File "{path}", line {line_of(path, "broken in version one")}, in broken' in text
    assert 'raise ValueError("broken in version one")' in text
    # A function deployment too.
    fn_blob = build_app_spec(mod.plain.bind()).deployments["plain"].serialized()
    assert cloudpickle.loads(fn_blob)[0] is mod.plain.func_or_class


def test_an_edited_module_runs_the_deployed_copy_with_its_source(user_module: tuple[str, Path]) -> None:
    """A replica started after the file changed (a replacement, a scale-up) runs what was
    deployed, and its tracebacks show the deployed lines."""
    name, path = user_module
    mod = importlib.import_module(name)
    blob = build_app_spec(mod.Model.bind(2)).deployments["Model"].serialized()
    path.write_text(MODULE_V1.replace("x * self.scale", "x * self.scale * 1000")
                    .replace('raise ValueError("broken in version one")', 'raise ValueError("two")'))
    sys.modules.pop(name, None)  # a fresh replica process has not imported it
    _codeship._digests.clear()
    linecache.checkcache()
    target, args, kwargs = cloudpickle.loads(blob)
    obj = target(*args, **kwargs)
    assert obj.predict(2) == 4  # the deployed code, not the edited file's
    text = failure_text(obj.broken)
    assert f'File "{path}", line {line_of(path, "two")}, in broken' in text
    assert 'raise ValueError("broken in version one")' in text  # the deployed line, not "two"


def test_main_module_code_keeps_its_file_name_and_source(tmp_path: Path) -> None:
    """A class from ``__main__`` or a notebook cell travels by value: its code keeps its file
    name, and the replica gets the source lines even where no such file exists."""
    cell = str(tmp_path / "notebook_cell_3.py")  # never written: a notebook's cell
    source = "class Model:\n    def predict(self, x):\n        return x / 0\n"
    linecache.cache[cell] = (len(source), None, source.splitlines(True), cell)  # as IPython does
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, cell, "exec"), namespace)
    dep = serve.deployment(namespace["Model"])
    blob = build_app_spec(dep.bind()).deployments["Model"].serialized()
    del linecache.cache[cell]  # the replica's process never saw the cell
    target, _, _ = cloudpickle.loads(blob)
    text = failure_text(target().predict, 1)
    assert f'File "{cell}", line 3, in predict' in text
    assert "return x / 0" in text


def test_code_version_follows_the_code(user_module: tuple[str, Path]) -> None:
    name, path = user_module

    def version() -> str:
        return build_app_spec(reimport(name).app).deployments["Model"].code_version

    first = version()
    assert version() == first  # the same code read again: the same version (no needless restart)
    path.write_text(MODULE_V1 + "\n# a comment after the code\n")
    assert version() == first  # a change elsewhere in the file does not restart this deployment
    path.write_text(MODULE_V1.replace("x * self.scale", "x * self.scale + 1"))
    changed = version()
    assert changed != first
    path.write_text(MODULE_V1)
    assert version() == first
    # Constructor arguments count too.
    mod = reimport(name)
    assert build_app_spec(mod.Model.bind(5)).deployments["Model"].code_version != first


def test_a_portable_copy_keeps_the_version(user_module: tuple[str, Path]) -> None:
    """The instance's state keeps specs without their code: the version must not change (or a
    restarted controller would replace every replica)."""
    from shoal.runtime.state import portable

    mod = importlib.import_module(user_module[0])
    spec = build_app_spec(mod.app)
    assert portable(spec).deployments["Model"].code_version == spec.deployments["Model"].code_version


@serve.deployment
class Keeper:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_an_unpicklable_bind_argument_names_the_deployment_and_the_argument() -> None:
    spec = build_app_spec(Keeper.bind(1, lock=threading.Lock()))
    with pytest.raises(TypeError, match=r"deployment 'Keeper': bind argument 'lock' \(lock\) cannot be sent"):
        spec.deployments["Keeper"].serialized()
    spec = build_app_spec(Keeper.bind("ok", (i for i in range(3))))
    with pytest.raises(TypeError, match=r"deployment 'Keeper': positional bind argument 1 \(generator\)"):
        spec.deployments["Keeper"].serialized()


def test_get_app_handle_without_an_instance_says_so(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_RUN_DIR", str(tmp_path / "none"))  # nothing runs there
    with pytest.raises(RayServeException, match="not connected to a shoal instance") as info:
        serve.get_app_handle("default")
    msg = str(info.value)
    assert "serve.start()" in msg and "does not exist" not in msg
    assert "no running shoal instance" in msg and str(tmp_path / "none") in msg
    with pytest.raises(RayServeException, match="cannot get a handle to deployment 'Keeper'"):
        serve.get_deployment_handle("Keeper", "default")
    assert serve.status().applications == {}  # a plain process with nothing to attach to
