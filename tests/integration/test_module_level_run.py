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


def test_serve_start_refuses_a_directory_another_process_owns(run_dir: str) -> None:
    """One instance per directory, for Python programs too: the lock `shoal run` and `shoal start`
    take is also taken (and released at shutdown) by serve.start."""
    import subprocess
    import textwrap

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from shoal.runtime.rundir import RunDir
            lock = RunDir({run_dir!r}).lock()
            print("held", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=rf"another shoal instance \(pid {holder.pid}\)"):
            serve.start(http_options={"port": 0}, _run_dir=run_dir)
        assert api._instance is None
    finally:
        holder.kill()
        holder.wait(10)
    # The owner gone, the directory is free; the lock is released again at shutdown.
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        from shoal.runtime.ownership import held_here

        assert held_here(run_dir)
    finally:
        serve.shutdown()
    from shoal.runtime.ownership import held_here

    assert not held_here(run_dir)
