"""The `shoal` command line, run as real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
from conftest import child_pids, wait_until

APP = textwrap.dedent('''
    from starlette.requests import Request
    from shoal import serve
    from shoal.handle import DeploymentHandle

    @serve.deployment
    class Greeter:
        def __init__(self, greeting: str = "hello") -> None:
            self.greeting = greeting

        def greet(self, name: str) -> str:
            return f"{self.greeting} {name}"

    @serve.deployment
    class Front:
        def __init__(self, greeter: DeploymentHandle) -> None:
            self.greeter = greeter

        async def __call__(self, request: Request) -> str:
            return await self.greeter.greet.remote(request.query_params.get("name", "world"))

    app = Front.bind(Greeter.bind())

    def build(args: dict) -> serve.Application:
        return Front.bind(Greeter.bind(args.get("greeting", "hello")))
''')


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shoal(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = child_pids(p)
        except OSError:
            continue
        out |= kids
        todo.extend(kids)
    return out


@pytest.fixture
def project(tmp_path: Path, run_dir: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "myapp.py").write_text(APP)
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}
    return tmp_path, env


def start_run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    proc.output = lines  # type: ignore[attr-defined]

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc


def reap(proc: subprocess.Popen[str]) -> None:
    """Stop a `shoal run` a test started, whatever state the test left it in."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def wait_started(proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    """Until `shoal run` says it is ready (HTTP may answer a little earlier)."""
    return wait_until(lambda: any("Press Ctrl-C" in x for x in proc.output), timeout, 0.05)  # type: ignore[attr-defined]


def wait_http(url: str, timeout: float = 60) -> bool:
    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    return wait_until(ok, timeout, 0.1)


def test_help() -> None:
    for cmd in ([], ["run"], ["build"], ["status"], ["shutdown"], ["delete"]):
        r = subprocess.run([sys.executable, "-m", "shoal.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage" in r.stdout


def test_run_import_path_status_and_shutdown(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    port = free_port()
    proc = start_run(["myapp:app", "--port", str(port)], cwd, env)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/?name=cli"), "".join(proc.output)  # type: ignore[attr-defined]
        assert wait_started(proc)
        assert httpx.get(f"http://127.0.0.1:{port}/?name=cli").text == "hello cli"
        kids = descendants(proc.pid)
        assert len(kids) >= 3  # proxy + two replicas, each its own process
        st = shoal("status", "--json", cwd=cwd, env=env)
        assert st.returncode == 0, st.stderr
        assert '"RUNNING"' in st.stdout and '"Greeter"' in st.stdout
        table = shoal("status", cwd=cwd, env=env)
        assert "Front" in table.stdout
        down = shoal("shutdown", cwd=cwd, env=env)
        assert down.returncode == 0, down.stderr
        assert proc.wait(30) == 0
        assert wait_until(lambda: all(not os.path.exists(f"/proc/{k}") or _zombie(k) for k in kids), 10)
    finally:
        reap(proc)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def test_run_config_file_and_ctrl_c(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    port = free_port()
    (cwd / "serve.yaml").write_text(textwrap.dedent(f"""
        http_options:
          host: 127.0.0.1
          port: {port}
        applications:
          - name: greet
            route_prefix: /greet
            import_path: myapp:build
            args:
              greeting: ahoy
            deployments:
              - name: Greeter
                num_replicas: 2
    """))
    proc = start_run(["serve.yaml"], cwd, env)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/greet?name=sailor")
        assert httpx.get(f"http://127.0.0.1:{port}/greet?name=sailor").text == "ahoy sailor"
        st = shoal("status", "--json", cwd=cwd, env=env)
        assert '"RUNNING": 2' in st.stdout
        assert wait_started(proc)
        kids = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
        assert wait_until(lambda: all(_zombie(k) for k in kids), 10)
    finally:
        reap(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_everything(project: tuple[Path, dict[str, str]], sig: signal.Signals) -> None:
    cwd, env = project
    port = free_port()
    proc = start_run(["myapp:app", "--port", str(port)], cwd, env)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/")
        assert wait_started(proc)
        kids = descendants(proc.pid)
        assert kids
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        assert wait_until(lambda: all(_zombie(k) for k in kids), 10)
    finally:
        reap(proc)


def test_script_exit_without_shutdown_cleans_up(tmp_path: Path, run_dir: str) -> None:
    script = tmp_path / "leaky.py"
    script.write_text(textwrap.dedent('''
        import os
        from shoal import serve

        @serve.deployment(num_replicas=2)
        def f(x):
            return os.getpid()

        serve.start(http_options={"port": 0})
        h = serve.run(f.bind())
        print("PIDS", sorted({h.remote(i).result() for i in range(20)}))
        # no serve.shutdown(): atexit must stop the replicas and the proxy
    '''))
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    line = next(x for x in r.stdout.splitlines() if x.startswith("PIDS"))
    pids = [int(p) for p in line[len("PIDS ["):-1].split(", ")]
    assert len(pids) == 2
    assert wait_until(lambda: all(_zombie(p) for p in pids), 10)


def test_killed_driver_leaves_no_process(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    port = free_port()
    proc = start_run(["myapp:app", "--port", str(port)], cwd, env)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/")
        kids = descendants(proc.pid)
        proc.kill()  # kill -9: no chance to clean up
        proc.wait()
        assert wait_until(lambda: all(_zombie(k) for k in kids), 15)
    finally:
        reap(proc)


def test_bad_config_names_file_and_field(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    (cwd / "bad.yaml").write_text(textwrap.dedent("""
        applications:
          - name: greet
            import_path: myapp:app
            deployments:
              - name: Greeter
                num_replicas: -1
    """))
    r = shoal("run", "bad.yaml", cwd=cwd, env=env)
    assert r.returncode == 2
    assert "bad.yaml" in r.stderr and "applications[0].deployments[0].num_replicas" in r.stderr


def test_bad_import_path(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    r = shoal("run", "nosuchmodule:app", cwd=cwd, env=env)
    assert r.returncode == 2 and "nosuchmodule" in r.stderr


def _session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (from /proc/PID/stat: the session is field 6)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(name))
    return out


def test_an_app_that_fails_to_import_stops_the_instance_it_started(project: tuple[Path, dict[str, str]]) -> None:
    # shoal run starts the instance (proxy, spare) before importing the app: a failed import stops them.
    cwd, env = project
    (cwd / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", "broken:app"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "broken on purpose" in err
    assert wait_until(lambda: not _session_members(proc.pid), 10), _session_members(proc.pid)


def test_status_without_instance(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    r = shoal("status", cwd=cwd, env=env)
    assert r.returncode != 0 and "no running shoal instance" in r.stderr


def test_classes_defined_in_main(tmp_path: Path, run_dir: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from shoal import serve

        @dataclass
        class Point:
            x: int
            y: int

        @serve.deployment
        class Mover:
            def move(self, p: Point) -> Point:
                return Point(p.x + 1, p.y + 1)

        if __name__ == "__main__":
            serve.start(http_options={"port": 0})
            h = serve.run(Mover.bind())
            print("RESULT", h.move.remote(Point(1, 2)).result())
            serve.shutdown()
    '''))
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert "RESULT Point(x=2, y=3)" in r.stdout, r.stderr


def test_build_writes_a_config_that_runs(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    r = shoal("build", "myapp:app", "-o", "built.yaml", cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    text = (cwd / "built.yaml").read_text()
    assert "import_path: myapp:app" in text and "name: Greeter" in text and "name: Front" in text
    from shoal.schema import load_config_file

    config = load_config_file(cwd / "built.yaml")
    assert config.applications[0].route_prefix == "/"
    # The generated file is what `shoal run` takes (with a free port).
    port = free_port()
    (cwd / "built.yaml").write_text(text.replace("port: 8000", f"port: {port}"))
    proc = start_run(["built.yaml"], cwd, env)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/?name=built")
        assert httpx.get(f"http://127.0.0.1:{port}/?name=built").text == "hello built"
    finally:
        proc.terminate()
        proc.wait(30)
    bad = shoal("build", "myapp:build", cwd=cwd, env=env)
    assert bad.returncode != 0 and "not a bound application" in bad.stderr
