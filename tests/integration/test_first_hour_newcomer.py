"""Issue 19's newcomer session, scripted end to end on a pseudo-terminal: `shoal run --reload`
(what `make run` runs, with the app's own files), a request, an edit, a constructor broken and
fixed, a request that raises, a module that fails to import and is fixed, then Ctrl-C. Every
error must show the user's file and line; an unchanged deployment with a module-level logger
is never restarted; the previous version serves while a broken one is refused; nothing is
left running."""

from __future__ import annotations

import os
import re
import signal
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from test_cli import descendants
from test_first_hour_terminal_run import PtyRun, free_port

APP = textwrap.dedent('''
    import logging
    import os

    from starlette.requests import Request

    from shoal import serve
    from shoal.handle import DeploymentHandle

    logger = logging.getLogger(__name__)


    @serve.deployment
    class Model:
        def __init__(self) -> None:
            logger.info("Model loading")
            self.weights = 2

        def predict(self, x: int) -> dict:
            logger.info("predict %s", x)
            return {"y": x * self.weights, "model_pid": os.getpid()}


    @serve.deployment
    class Front:
        def __init__(self, model: DeploymentHandle) -> None:
            self.model = model

        async def __call__(self, request: Request) -> dict:
            x = int(request.query_params.get("x", "1"))
            if x < 0:
                raise ValueError("x must not be negative")
            out = await self.model.predict.remote(x)
            return {"version": "v1", **out}


    app = Front.bind(Model.bind())
''')


def line_of(source: str, needle: str) -> int:
    return next(i for i, line in enumerate(source.splitlines(), 1) if needle in line)


def get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None


def body(url: str) -> dict | None:  # type: ignore[type-arg]
    r = get(url)
    return r.json() if r is not None and r.status_code == 200 else None


@pytest.fixture
def newcomer(tmp_path: Path, run_dir: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "app.py").write_text(APP)
    return tmp_path, {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}


def test_a_newcomers_session(newcomer: tuple[Path, dict[str, str]]) -> None:
    cwd, env = newcomer
    app = cwd / "app.py"
    path = str(app)
    port = free_port()
    url = f"http://127.0.0.1:{port}/?x=3"
    run = PtyRun(["app:app", "--reload", "--port", str(port)], cwd, env)
    try:
        assert run.wait_for("Watching the app's files"), run.text()
        first = body(url)
        assert first is not None and first["version"] == "v1" and first["y"] == 6, run.text()
        model_pid = first["model_pid"]

        # 1. An edit to Front only: Front rolls, Model (same code, module-level logger) keeps its process.
        seen = run.text().count("reloaded in")
        app.write_text(APP.replace('"version": "v1"', '"version": "v2"'))
        assert wait_until(lambda: run.text().count("reloaded in") > seen, 60), run.text()
        assert wait_until(lambda: (body(url) or {}).get("version") == "v2", 30), run.text()
        second = body(url)
        assert second is not None and second["model_pid"] == model_pid, run.text()
        assert "default/Model: code or restart-requiring options changed" not in run.text()

        # 2. A broken constructor: the error names the user's file and line; v2 keeps serving.
        broken = APP.replace('"version": "v1"', '"version": "v2"').replace(
            "        self.weights = 2\n",
            "        self.weights = 2\n        raise RuntimeError('weights file missing')\n")
        app.write_text(broken)
        assert run.wait_for("redeploy of default failed"), run.text()
        out = run.text()
        assert f'File "{path}", line {line_of(broken, "weights file missing")}, in __init__' in out, out
        assert "RuntimeError: weights file missing" in out
        still = body(url)
        assert still is not None and still["version"] == "v2" and still["model_pid"] == model_pid

        # 3. Fixed: a new Model version serves.
        fixed = APP.replace('"version": "v1"', '"version": "v3"').replace("self.weights = 2", "self.weights = 10")
        app.write_text(fixed)
        assert wait_until(lambda: (body(url) or {}).get("y") == 30, 60), run.text()
        assert (body(url) or {}).get("version") == "v3"

        # 4. A request that raises: a 500, and the terminal shows the traceback at the user's line.
        bad = get(f"http://127.0.0.1:{port}/?x=-1")
        assert bad is not None and bad.status_code == 500
        where = f'File "{path}", line {line_of(fixed, "must not be negative")}, in __call__'
        assert run.wait_for(re.escape(where), 30), run.text()
        assert run.wait_for(r"\(Front pid=\d+\) ValueError: x must not be negative", 30), run.text()

        # 5. A module that fails to import: file and line shown, the previous version keeps serving.
        app.write_text(fixed + "\nsettings = load_settings()\n")
        assert run.wait_for("reload failed, the previous version keeps serving"), run.text()
        nameerr_line = len((fixed + "\nsettings = load_settings()\n").splitlines())
        assert run.wait_for(re.escape(f'File "{path}", line {nameerr_line}, in <module>'), 10), run.text()
        assert (body(url) or {}).get("version") == "v3"
        app.write_text(fixed.replace('"version": "v3"', '"version": "v4"'))
        assert wait_until(lambda: (body(url) or {}).get("version") == "v4", 60), run.text()

        # 6. Ctrl-C: everything it started is gone.
        kids = descendants(run.proc.pid)
        assert kids
        os.kill(run.proc.pid, signal.SIGINT)
        assert run.proc.wait(60) == 0, run.text()
        assert "stopped" in run.text()
        assert wait_until(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), 15)
    finally:
        run.stop()


def test_reload_starts_with_a_broken_constructor_and_waits_for_the_fix(newcomer: tuple[Path, dict[str, str]]) -> None:
    cwd, env = newcomer
    app = cwd / "app.py"
    broken = APP.replace("        self.weights = 2\n",
                         "        self.weights = 2\n        raise OSError('no GPU here')\n")
    app.write_text(broken)
    port = free_port()
    url = f"http://127.0.0.1:{port}/?x=2"
    run = PtyRun(["app:app", "--reload", "--port", str(port)], cwd, env)
    try:
        assert run.wait_for("Save a fix to retry"), run.text()
        out = run.text()
        assert f'File "{app}", line {line_of(broken, "no GPU here")}, in __init__' in out, out
        assert run.proc.poll() is None  # still running, watching
        refused = get(url)
        assert refused is not None and refused.status_code == 503, run.text()
        assert "failed to deploy" in refused.json()["message"]
        app.write_text(APP)
        assert wait_until(lambda: (body(url) or {}).get("y") == 4, 60), run.text()
    finally:
        run.stop()


def test_reload_starts_with_a_module_that_does_not_import(newcomer: tuple[Path, dict[str, str]]) -> None:
    cwd, env = newcomer
    app = cwd / "app.py"
    app.write_text(APP + "\nfrom app_settings import SETTINGS\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}/?x=2"
    run = PtyRun(["app:app", "--reload", "--port", str(port)], cwd, env)
    try:
        assert run.wait_for("Save a fix to retry"), run.text()
        out = run.text()
        assert "No module named 'app_settings'" in " ".join(out.split())  # rich wraps long lines
        assert f'File "{app}", line {len(APP.splitlines()) + 2}, in <module>' in out, out
        app.write_text(APP)  # the module that failed to import is watched too
        assert wait_until(lambda: (body(url) or {}).get("y") == 4, 60), run.text()
    finally:
        run.stop()
