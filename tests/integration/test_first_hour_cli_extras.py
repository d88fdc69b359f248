"""Issue 19's CLI extras against a real `shoal run`: app-builder arguments on the command line,
the FastAPI `/docs` hint, `shoal config`, and handles from another process attached to the
running instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import yaml
from test_cli import free_port, reap, shoal, start_run, wait_started

from shoal.schema import ServeDeploySchema

APP = textwrap.dedent('''
    from fastapi import FastAPI
    from shoal import serve

    api = FastAPI()


    @serve.deployment(num_replicas=1, max_ongoing_requests=9)
    @serve.ingress(api)
    class Greeter:
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting

        @api.get("/")
        def root(self, name: str = "world") -> dict:
            return {"msg": f"{self.greeting}, {name}"}

        def greet(self, name: str) -> str:
            return f"{self.greeting}, {name}"


    def build(args: dict) -> serve.Application:
        return Greeter.bind(args.get("greeting", "hello"))
''')

CLIENT = textwrap.dedent('''
    import json
    from shoal import serve

    out = {}
    out["deployment"] = serve.get_deployment_handle("Greeter", "default").greet.remote("dep").result(timeout_s=30)
    out["app"] = serve.get_app_handle("default").greet.remote("app").result(timeout_s=30)
    st = serve.status()
    out["status"] = {n: a.status.value for n, a in st.applications.items()}
    try:
        serve.get_app_handle("nope")
    except Exception as e:
        out["missing"] = str(e)
    serve.shutdown()  # an attached process lets go; the instance keeps serving
    print(json.dumps(out))
''')


@pytest.fixture
def fastapi_project(tmp_path: Path, run_dir: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "greetapp.py").write_text(APP)
    (tmp_path / "client.py").write_text(CLIENT)
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}
    return tmp_path, env


def test_builder_args_docs_hint_config_and_attached_handles(fastapi_project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = fastapi_project
    port = free_port()
    proc = start_run(["greetapp:build", "greeting=hi", "--port", str(port)], cwd, env)
    try:
        assert wait_started(proc), "".join(proc.output)  # type: ignore[attr-defined]
        out = "".join(proc.output)  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        assert f"default: {base}/   (API docs: {base}/docs)" in out
        assert httpx.get(f"{base}/?name=bob", timeout=10).json() == {"msg": "hi, bob"}  # the builder got the arg
        assert httpx.get(f"{base}/docs", timeout=10).status_code == 200  # the advertised page exists

        cfg = shoal("config", cwd=cwd, env=env)
        assert cfg.returncode == 0, cfg.stderr
        assert cfg.stdout.startswith("# the running configuration of the shoal instance at ")
        parsed = ServeDeploySchema.from_dict(yaml.safe_load(cfg.stdout), source="shoal config")
        (app,) = parsed.applications
        assert (app.name, app.import_path, app.args, app.route_prefix) == ("default", "greetapp:build",
                                                                            {"greeting": "hi"}, "/")
        assert app.deployments[0].name == "Greeter" and app.deployments[0].max_ongoing_requests == 9
        assert parsed.http_options.port == port
        as_json = json.loads(shoal("config", "--json", cwd=cwd, env=env).stdout)
        assert as_json["applications"][0]["args"] == {"greeting": "hi"}
        unknown = shoal("config", "-n", "nope", cwd=cwd, env=env)
        assert unknown.returncode != 0 and "no application 'nope' is deployed (deployed: 'default')" in unknown.stderr

        client = subprocess.run([sys.executable, "client.py"], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=90)
        assert client.returncode == 0, client.stderr
        got = json.loads(client.stdout.strip().splitlines()[-1])
        assert got["deployment"] == "hi, dep" and got["app"] == "hi, app"
        assert got["status"] == {"default": "RUNNING"}
        assert "'nope' does not exist" in got["missing"] and "'default'" in got["missing"]
        # The attached client's serve.shutdown() did not stop the instance.
        assert httpx.get(f"{base}/?name=after", timeout=10).json() == {"msg": "hi, after"}
        assert proc.poll() is None
    finally:
        shoal("shutdown", cwd=cwd, env=env)
        try:
            proc.wait(30)
        finally:
            reap(proc)


def test_bad_builder_args_fail_before_anything_starts(fastapi_project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = fastapi_project
    r = subprocess.run([sys.executable, "-m", "shoal.cli", "run", "greetapp:build", "greeting", "--port",
                        str(free_port())], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "builder argument 'greeting' is not KEY=VALUE" in r.stderr


def test_config_without_an_instance(fastapi_project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = fastapi_project
    r = shoal("config", cwd=cwd, env=env)
    assert r.returncode != 0 and "no running shoal instance" in r.stderr
