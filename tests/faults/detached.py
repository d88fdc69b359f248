"""A detached instance (`shoal start`) driven through the real command line, for fault tests:
its project directory, its address, every pid it had (killed by pid if a test fails)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from shoal.runtime.rundir import RunDir

APP = textwrap.dedent('''
    from shoal import serve

    @serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=2)
    class Hello:
        async def __call__(self, request) -> str:
            return "hello"

    app = Hello.bind()
''')
CONFIG = "applications:\n- name: hello\n  route_prefix: /\n  import_path: helloapp:app\n"
HUNG_AFTER_S = 20.0


@dataclass
class Instance:
    project: Path
    address: str
    seen: set[int] = field(default_factory=set)  # every pid of the instance, for the teardown

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SHOAL_RUN_DIR": self.address}
        p = subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=self.project, env=env,
                           capture_output=True, text=True, timeout=120)
        if check:
            assert p.returncode == 0, f"shoal {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        return p

    @property
    def rd(self) -> RunDir:
        return RunDir(self.address)

    def controller_pid(self) -> int:
        pid = int(Path(self.rd.controller_pid).read_text())
        self.seen.add(pid)
        return pid

    def start_and_deploy(self) -> tuple[str, str]:
        """``shoal start`` on a free port, deploy the hello app; (its URL, its port)."""
        self.cli("start", "-p", "0")
        self.cli("deploy", "hello.yaml")
        http = str(json.loads(self.cli("status", "--json").stdout)["http_address"])
        assert get(http + "/") == 200
        return http, http.rsplit(":", 1)[1]

    def processes(self) -> set[int]:
        found = set(self.rd.processes())
        self.seen |= found
        return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def is_daemon_of(pid: int, address: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"shoal.runtime.daemon" in cmd and address.encode() in cmd


def get(url: str) -> int:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return -1


@pytest.fixture
def detached(run_dir: str) -> Iterator[Instance]:
    project = Path(run_dir) / "proj"
    project.mkdir()
    (project / "helloapp.py").write_text(APP)
    (project / "hello.yaml").write_text(CONFIG)
    inst = Instance(project, os.path.join(run_dir, "inst"))
    try:
        yield inst
    finally:
        inst.cli("shutdown", check=False)
        for pid in inst.seen:  # whatever a failed test left behind: only this instance's, by pid
            if running(pid) and (inst.rd.owns(pid) or is_daemon_of(pid, inst.address)):
                os.kill(pid, signal.SIGKILL)
