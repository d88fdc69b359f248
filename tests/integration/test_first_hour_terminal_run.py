"""Issue 19, the `shoal run` terminal: replica output streamed with a prefix, one instance per
run directory, a port in use said at once, and Ctrl-C that says what it waits for and, pressed
twice, leaves nothing behind. Real `shoal run` processes on a pty, stopped by pid."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path

import httpx
import pytest
from conftest import wait_until

from shoal.runtime.rundir import RunDir

APP = textwrap.dedent('''
    import logging, os, time
    from shoal import serve

    log = logging.getLogger("chatty")

    @serve.deployment
    class Chatty:
        def __init__(self) -> None:
            print("constructing Chatty", flush=True)
            log.info("loading weights")
            time.sleep(float(os.environ.get("CHATTY_SLEEP_S", "0")))

        def __call__(self, request) -> str:
            print("in a request \\x1b]0;owned\\x07 done")
            log.info("an info record")
            if request.query_params.get("big"):
                print("B" * 3_000_000)
            return "ok"

    app = Chatty.bind()
''')

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PtyRun:
    """`shoal run` on a pseudo-terminal (120 columns); ``text()`` is what it showed, escapes removed."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", *args], cwd=cwd, env=env,
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.master = master
        self.raw = bytearray()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.raw += data

    def text(self) -> str:
        return ANSI.sub("", bytes(self.raw).decode("utf-8", "replace"))

    def wait_for(self, pattern: str, timeout: float = 90) -> bool:
        return wait_until(lambda: re.search(pattern, self.text()) is not None, timeout, 0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.reader.join(5)
        os.close(self.master)


def shoal(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=90)


@pytest.fixture
def project(tmp_path: Path, run_dir: str) -> tuple[Path, dict[str, str]]:
    (tmp_path / "chatty.py").write_text(APP)
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "PYTHONPATH": os.getcwd()}
    return tmp_path, env


def test_replica_output_streams_and_a_second_run_is_refused(project: tuple[Path, dict[str, str]],
                                                             run_dir: str) -> None:
    cwd, env = project
    port = free_port()
    # As after `make run`: this venv's `shoal` is not on PATH, so it says how to reach it.
    run = PtyRun(["chatty:app", "--port", str(port)], cwd, {**env, "PATH": "/usr/bin:/bin"})
    try:
        assert run.wait_for("Press Ctrl-C"), run.text()
        out = run.text()
        assert re.search(r"\(Chatty pid=\d+\) constructing Chatty(.|\n)*ready in", out), out
        assert re.search(r"\(Chatty pid=\d+\) \S+ \S+ INFO chatty: loading weights", out), out
        assert "From another terminal:" in out
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).text == "ok"
        assert httpx.get(f"http://127.0.0.1:{port}/?big=1", timeout=60).text == "ok"
        assert run.wait_for(r"line cut: \d+ more bytes"), run.text()[-3000:]
        out = run.text()
        assert re.search(r"\(Chatty pid=\d+\) in a request \\x1b\]0;owned\\x07 done", out), out[-3000:]
        assert re.search(r"\(Chatty pid=\d+\) \S+ \S+ INFO chatty request_id=\w+: an info record", out)
        assert "\x1b]0;owned" not in bytes(run.raw).decode("utf-8", "replace")  # escaped, never obeyed

        # A second `shoal run` on the same directory: refused at once, naming the owner.
        second = subprocess.run([sys.executable, "-m", "shoal.cli", "run", "chatty:app", "--port", "0"],
                                cwd=cwd, env=env, capture_output=True, text=True, timeout=90)
        assert second.returncode == 1
        assert f"pid {run.proc.pid}" in second.stderr and run_dir in second.stderr, second.stderr
        detached = shoal("start", "--address", run_dir, "--port", "0", cwd=cwd, env=env)
        assert detached.returncode == 1 and f"pid {run.proc.pid}" in detached.stderr, detached.stderr
        status = shoal("status", "--json", cwd=cwd, env=env)  # the first one's socket is still there
        assert status.returncode == 0 and '"Chatty"' in status.stdout, status.stderr
        logs = shoal("logs", "Chatty", cwd=cwd, env=env)  # the current session's files
        assert "constructing Chatty" in logs.stdout, logs.stdout + logs.stderr
        assert os.path.basename(RunDir(run_dir).logs_dir).startswith("session_")

        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(60) == 0
    finally:
        run.stop()


def test_port_in_use_is_said_before_the_app_is_imported(project: tuple[Path, dict[str, str]]) -> None:
    cwd, env = project
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        got = subprocess.run([sys.executable, "-m", "shoal.cli", "run", "no_such_module:app", "--port", str(port)],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=90)
    assert got.returncode == 1
    assert "--port" in got.stderr and str(port) in got.stderr, got.stderr
    assert "no_such_module" not in got.stderr  # the app was never imported


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_ctrl_c_says_what_it_waits_for_and_twice_kills_everything(project: tuple[Path, dict[str, str]],
                                                                  run_dir: str) -> None:
    from conftest import child_pids

    cwd, env = project
    port = free_port()
    run = PtyRun(["chatty:app", "--port", str(port)], cwd, {**env, "CHATTY_SLEEP_S": "600"})
    try:
        # The progress line moves while the constructor runs, and shows what the replica logged.
        assert run.wait_for(r"0/1 replicas ([4-9]|\d\d+)s \| loading weights"), run.text()[-3000:]
        assert run.wait_for(r"0/1 replicas ([5-9]|\d\d+)s"), run.text()[-3000:]
        started = child_pids(run.proc.pid)
        assert started
        run.proc.send_signal(signal.SIGINT)
        assert run.wait_for(r"waiting for 1 replica\(s\).*default/Chatty \(1 (starting|stopping)\)"), run.text()[-3000:]
        assert "Ctrl-C again" in run.text()
        run.proc.send_signal(signal.SIGINT)
        assert run.proc.wait(60) == 130
        assert run.wait_for(r"killing \d+ process")
        assert wait_until(lambda: not any(_alive(p) for p in started), 30)
        assert RunDir(run_dir).processes() == []
        with socket.socket() as s:  # nothing holds the port
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        run.stop()
    # An immediate restart on the same port and directory works; --quiet-replicas keeps the
    # replica's output off the terminal (its file still has it).
    again = PtyRun(["chatty:app", "--port", str(port), "--quiet-replicas"], cwd, env)
    try:
        assert again.wait_for("Press Ctrl-C"), again.text()
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).text == "ok"
        assert "(Chatty pid=" not in again.text() and "constructing Chatty" not in again.text()
        assert "constructing Chatty" in shoal("logs", "Chatty", cwd=cwd, env=env).stdout
        again.proc.send_signal(signal.SIGINT)
        assert again.proc.wait(60) == 0
    finally:
        again.stop()
