"""`shoal run --reload` and deploy progress, on a real `shoal run` subprocess."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from test_cli import descendants, free_port, reap, start_run

HELLO = textwrap.dedent('''
    from shoal import serve

    @serve.deployment
    class Hello:
        def __call__(self, request):
            return "hello v1"

    app = Hello.bind()
''')


@pytest.fixture
def devproject(tmp_path: Path, run_dir: str) -> tuple[Path, dict[str, str]]:
    return tmp_path, {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}


def text(url: str) -> str:
    try:
        return httpx.get(url, timeout=5).text
    except httpx.HTTPError as e:
        return repr(e)


def test_reload_rolls_new_code_and_survives_a_syntax_error(devproject: tuple[Path, dict[str, str]]) -> None:
    cwd, env = devproject
    (cwd / "hello.py").write_text(HELLO)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_run(["hello:app", "-p", str(port), "--reload"], cwd, env)
    try:
        assert wait_until(lambda: text(url) == "hello v1", 90), "".join(proc.output)  # type: ignore[attr-defined]
        (cwd / "hello.py").write_text(HELLO.replace("hello v1", "hello v2"))
        assert wait_until(lambda: text(url) == "hello v2", 60), "".join(proc.output)  # type: ignore[attr-defined]
        # A syntax error: the old version keeps serving and the error is shown.
        (cwd / "hello.py").write_text(HELLO.replace("hello v1", "hello v2") + "\ndef broken(:\n")
        assert wait_until(lambda: "reload failed" in "".join(proc.output), 30)  # type: ignore[attr-defined]
        assert "SyntaxError" in "".join(proc.output)  # type: ignore[attr-defined]
        assert text(url) == "hello v2"
        # The fix is picked up although the broken module never imported.
        (cwd / "hello.py").write_text(HELLO.replace("hello v1", "hello v3"))
        assert wait_until(lambda: text(url) == "hello v3", 60), "".join(proc.output)  # type: ignore[attr-defined]
        out = "".join(proc.output)  # type: ignore[attr-defined]
        assert "changed: hello.py" in out and "rolling update" in out and "reloaded in" in out
        kids = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert wait_until(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), 15)
    finally:
        reap(proc)


def test_progress_names_the_failing_deployment(devproject: tuple[Path, dict[str, str]]) -> None:
    cwd, env = devproject
    (cwd / "twodeps.py").write_text(textwrap.dedent('''
        import time
        from shoal import serve
        from shoal.handle import DeploymentHandle

        @serve.deployment(num_replicas=2)
        class Slowish:
            def __init__(self) -> None:
                time.sleep(0.5)

            def get(self) -> str:
                return "ok"

        @serve.deployment
        class Broken:
            def __init__(self, dep: DeploymentHandle) -> None:
                raise RuntimeError("no model file at /nowhere")

        good = Slowish.bind()
        bad = Broken.bind(Slowish.bind())
    '''))
    port = free_port()
    ok = start_run(["twodeps:good", "-p", str(port)], cwd, env)
    try:
        assert wait_until(lambda: "ready in" in "".join(ok.output), 60), "".join(ok.output)  # type: ignore[attr-defined]
        out = "".join(ok.output)  # type: ignore[attr-defined]
        assert "Slowish" in out and "2/2 replicas" in out and f"http://127.0.0.1:{port}/" in out
        ok.send_signal(signal.SIGTERM)
        assert ok.wait(timeout=60) == 0
    finally:
        reap(ok)
    bad = start_run(["twodeps:bad", "-p", str(free_port())], cwd, env)
    try:
        assert bad.wait(timeout=120) == 1
        out = "".join(bad.output)  # type: ignore[attr-defined]
        assert "Broken" in out and "failed" in out and "no model file at /nowhere" in out
    finally:
        reap(bad)
