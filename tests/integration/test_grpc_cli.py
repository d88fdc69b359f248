"""`shoal run serve.yaml` starts the gRPC ingress a config file's `grpc_options` asks for (and says
where), `shoal deploy` says that grpc_options apply at start, and `shoal start --grpc-port
--grpc-servicer-functions` starts a detached instance that serves gRPC (its options checked first,
with errors that name the option)."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
protoc = pytest.importorskip("grpc_tools.protoc")

from conftest import wait_until  # noqa: E402
from test_cli import free_port, reap, shoal, start_run, wait_started  # noqa: E402

PROTO = """
syntax = "proto3";
package clitest;
message Question { string text = 1; }
message Answer { string text = 1; }
service Asker { rpc Ask(Question) returns (Answer); }
"""

APP = textwrap.dedent('''
    import asker_pb2
    from shoal import serve

    @serve.deployment
    class Oracle:
        def Ask(self, request):
            return asker_pb2.Answer(text=f"yes, {request.text}")

    app = Oracle.bind()
''')


def test_run_config_file_serves_grpc(tmp_path: Path, run_dir: str) -> None:
    (tmp_path / "asker.proto").write_text(PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                        f"--grpc_python_out={tmp_path}", str(tmp_path / "asker.proto")]) == 0
    (tmp_path / "oracle.py").write_text(APP)
    grpc_port, http_port = free_port(), free_port()
    (tmp_path / "serve.yaml").write_text(textwrap.dedent(f"""
        http_options: {{port: {http_port}}}
        grpc_options:
          port: {grpc_port}
          grpc_servicer_functions: [asker_pb2_grpc.add_AskerServicer_to_server]
        applications:
          - name: oracle
            route_prefix: /oracle
            import_path: oracle:app
    """))
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    proc = start_run(["serve.yaml"], tmp_path, env)
    try:
        assert wait_started(proc), "".join(proc.output)  # type: ignore[attr-defined]
        assert f"gRPC: 127.0.0.1:{grpc_port}" in "".join(proc.output)  # type: ignore[attr-defined]
        sys.path.insert(0, str(tmp_path))
        try:
            pb2 = importlib.import_module("asker_pb2")
            stub = importlib.import_module("asker_pb2_grpc").AskerStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
            reply = stub.Ask(pb2.Question(text="shoal"), timeout=30)
        finally:
            sys.path.remove(str(tmp_path))
        assert reply.text == "yes, shoal"
        deployed = shoal("deploy", "serve.yaml", "--no-wait", cwd=tmp_path, env=env)
        assert deployed.returncode == 0, deployed.stderr
        assert "grpc_options apply when an instance starts" in deployed.stderr
        assert shoal("shutdown", cwd=tmp_path, env=env).returncode == 0
        assert wait_until(lambda: proc.poll() is not None, 60)
    finally:
        reap(proc)


def _compile(folder: Path) -> None:
    (folder / "asker.proto").write_text(PROTO)
    assert protoc.main(["grpc_tools.protoc", f"-I{folder}", f"--python_out={folder}",
                        f"--grpc_python_out={folder}", str(folder / "asker.proto")]) == 0
    (folder / "oracle.py").write_text(APP)


def _ask(folder: Path, address: str) -> str:
    sys.path.insert(0, str(folder))
    try:
        pb2 = importlib.import_module("asker_pb2")
        with grpc.insecure_channel(address) as channel:
            stub = importlib.import_module("asker_pb2_grpc").AskerStub(channel)
            return str(stub.Ask(pb2.Question(text="detached"), timeout=30).text)
    finally:
        sys.path.remove(str(folder))


def _instance_pids(address: str) -> set[int]:
    """The controller and the processes it recorded (for a teardown that stops what is left)."""
    pids: set[int] = set()
    try:
        pids.add(int((Path(address) / "controller.pid").read_text()))
    except (OSError, ValueError):
        pass
    db = Path(address) / "state.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            pids |= {int(p) for (p,) in conn.execute("SELECT pid FROM processes")}
    return pids


def test_start_serves_grpc(tmp_path: Path, run_dir: str) -> None:
    _compile(tmp_path)
    (tmp_path / "serve.yaml").write_text(textwrap.dedent("""
        applications:
          - name: oracle
            route_prefix: /oracle
            import_path: oracle:app
    """))
    address = os.path.join(run_dir, "inst")
    env = {**os.environ, "SHOAL_RUN_DIR": address, "PYTHONPATH": os.getcwd()}  # the modules: from the cwd
    started = shoal("start", "-p", "0", "--grpc-port", "0", "--grpc-servicer-functions",
                    "asker_pb2_grpc.add_AskerServicer_to_server", cwd=tmp_path, env=env, timeout=120)
    pids = _instance_pids(address)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        found = re.search(r"^  grpc: (127\.0\.0\.1:\d+)$", started.stdout, re.MULTILINE)
        assert found is not None and not found.group(1).endswith(":0"), started.stdout
        deployed = shoal("deploy", "serve.yaml", cwd=tmp_path, env=env, timeout=120)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        pids |= _instance_pids(address)
        assert _ask(tmp_path, found.group(1)) == "yes, detached"
        status = shoal("status", "--json", cwd=tmp_path, env=env)
        assert f'"grpc_address": "{found.group(1)}"' in status.stdout, status.stdout
    finally:
        pids |= _instance_pids(address)
        shoal("shutdown", cwd=tmp_path, env=env, timeout=120)
        for pid in pids:  # whatever a failed test left behind, by pid
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"shoal" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_start_grpc_options_are_checked_first(tmp_path: Path, run_dir: str) -> None:
    _compile(tmp_path)
    address = os.path.join(run_dir, "inst")
    env = {**os.environ, "SHOAL_RUN_DIR": address, "PYTHONPATH": os.getcwd()}
    cases = [
        (["--grpc-servicer-functions", "no_such_pb2_grpc.add_AskerServicer_to_server"],
         "'--grpc-servicer-functions'", "cannot import module 'no_such_pb2_grpc'"),
        (["--grpc-servicer-functions", "asker_pb2_grpc.add_AskerServicer_to_server",
          "--grpc-servicer-functions", "asker_pb2_grpc.add_NoServicer_to_server"],
         "'--grpc-servicer-functions'", "has no 'add_NoServicer_to_server'; it has add_AskerServicer_to_server"),
        (["--grpc-servicer-functions", "not a path"], "'--grpc-servicer-functions'",
         "'not a path' is not an import path"),
        (["--grpc-port", "9123"], "'--grpc-port'", "needs --grpc-servicer-functions"),
        (["--grpc-port", "70000", "--grpc-servicer-functions", "asker_pb2_grpc.add_AskerServicer_to_server"],
         "'--grpc-port'", "70000"),
    ]
    for args, option, why in cases:
        got = shoal("start", "-p", "0", *args, cwd=tmp_path, env=env)
        text = " ".join(got.stderr.split())  # click wraps long messages
        assert got.returncode == 2, (args, got.stdout, got.stderr)
        assert f"Invalid value for {option}" in text and why in text, (args, got.stderr)
    assert not os.path.exists(address)  # nothing started, nothing created
