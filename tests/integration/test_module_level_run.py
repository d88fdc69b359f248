"""A module that calls ``serve.run`` at its top level (common in scripts) and is imported by the
program that deploys it: replicas import that module to get the deployment's class, so its
``serve.run`` also runs there. It is refused inside a replica (NestedInstanceError) and the
replica falls back to the deployed by-value copy of the class, so the app still serves."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from conftest import Instance

from shoal import api, context, serve
from shoal.exceptions import NestedInstanceError

MODULE = '''
from shoal import serve


@serve.deployment
class Greeter:
    def __call__(self, name: str) -> str:
        return f"hello {name}"


app = Greeter.bind()
handle = serve.run(app, name="toplevel", route_prefix="/toplevel")  # at the top level, no __main__ guard
'''


def test_a_module_level_serve_run_does_not_break_its_replicas(instance: Instance, tmp_path: Path) -> None:
    (tmp_path / "toplevel_app_mod.py").write_text(MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("toplevel_app_mod")
        assert mod.handle.remote("you").result(timeout_s=30) == "hello you"
        assert serve.status().applications["toplevel"].status == "RUNNING"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toplevel_app_mod", None)


def test_serve_run_and_start_are_refused_inside_a_worker_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "_worker_process", "replica")

    @serve.deployment
    class D:
        def __call__(self) -> str:
            return "d"

    with pytest.raises(NestedInstanceError, match=r"inside a shoal replica process.*__name__ == \"__main__\""):
        serve.run(D.bind())
    with pytest.raises(NestedInstanceError, match=r"serve\.start"):
        serve.start()
    assert api._instance is None  # nothing was started
    # The in-process testing mode starts no instance, so it stays allowed.
    try:
        assert serve.run(D.bind(), _local_testing_mode=True).remote().result() == "d"
    finally:
        serve.shutdown()
