"""A ``logging_config.logs_dir`` that other users can write, on a real instance: the replica is
warned about it, writes its own regular file, and `shoal logs` does not read through a link
another user puts in place of that file."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve

NOBODY = 65534
log = logging.getLogger("tests.log_symlinks")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a link owned by another user needs root")
def test_shared_logs_dir_warned_and_never_read_through_anothers_link(instance: Instance, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    victim = tmp_path / "secret"
    victim.write_text("root only secret\n")
    victim.chmod(0o600)

    @serve.deployment(logging_config={"logs_dir": str(shared)})
    class Talk:
        def __call__(self, request: Request) -> str:
            log.info("talked")
            return "ok"

    serve.run(Talk.bind(), name="t", route_prefix="/t")
    assert httpx.get(f"{instance.url}/t", timeout=30).text == "ok"
    [own] = (Path(instance.run_dir) / "logs" / "t" / "Talk").glob("*.log")
    [real] = shared.glob("replica_t_Talk_*.log")
    assert own.is_symlink() and os.readlink(own) == str(real)
    st = os.lstat(real)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert wait_until(lambda: "talked" in real.read_text(), 10)
    assert f"{shared} is writable by other users and has no sticky bit" in real.read_text()

    def shoal_logs() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shoal.cli", "logs", "t/Talk", "--address", instance.run_dir],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})

    printed = shoal_logs()
    assert printed.returncode == 0 and "talked" in printed.stdout, printed.stderr
    # Another user swaps the file in the shared folder for a link to a root-only file.
    real.unlink()
    real.symlink_to(victim)
    os.lchown(real, NOBODY, NOBODY)
    printed = shoal_logs()
    assert printed.returncode == 0, printed.stderr
    assert "root only secret" not in printed.stdout
    assert victim.read_text() == "root only secret\n"
