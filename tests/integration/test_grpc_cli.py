"""`shoal run serve.yaml` starts the gRPC ingress a config file's `grpc_options` asks for (and says
where), and `shoal deploy` says that grpc_options apply at start."""

from __future__ import annotations

import importlib
import os
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
