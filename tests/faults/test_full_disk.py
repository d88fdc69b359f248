"""Issue 15: the disk under the run directory fills up for a while.

Metrics files are memory-mapped: a process that touched a page of one not backed by allocated
blocks would die of SIGBUS on a full disk. Metrics must degrade instead (samples dropped, a
warning), serving go on, and everything recover once there is space again.

The run directory is a small tmpfs mounted for the test (we need root; skipped otherwise).
"""

from __future__ import annotations

import errno
import glob
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator

import httpx
import pytest
from conftest import child_pids, wait_until
from loadgen import Load, report, running

from shoal import serve

TMPFS_SIZE = "64m"
FULL_FOR_S = 5.0
CHUNK = 1 << 20
SMALL_CHUNK = 4096
# Status codes the load never uses: each one is a new label set, so metrics files must grow.
NEW_STATUSES = (201, 202, 203, 205, 206, 207, 208, 226)
NEW_METHODS = ("POST", "PUT", "PATCH", "DELETE")
DROP_MESSAGE = "metrics samples dropped"


@serve.deployment(max_ongoing_requests=100)
class Echo:
    async def __call__(self, request: object) -> object:
        from starlette.responses import PlainTextResponse

        q = request.query_params  # type: ignore[attr-defined]
        return PlainTextResponse("ok", status_code=int(q.get("status", 200)))


def _mount(path: str) -> str | None:
    """Mount a tmpfs at ``path``; the reason when it cannot be done."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", path],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        return f"cannot mount a tmpfs here: {e} {detail.decode(errors='replace').strip()}"
    return None


@pytest.fixture
def small_disk() -> Iterator[str]:
    """A 64 MiB tmpfs to use as an instance's run directory; unmounted afterwards."""
    d = tempfile.mkdtemp(prefix="shoal-fd", dir="/tmp")
    why = _mount(d)
    if why is not None:
        os.rmdir(d)
        pytest.skip(why)
    try:
        yield d
    finally:
        if subprocess.run(["umount", d], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", d], capture_output=True, timeout=30)
        os.rmdir(d)


class Filler:
    """Keeps the file system of ``directory`` full until :meth:`release` (writes until ENOSPC,
    and again whenever something freed space)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "filler")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.stop = threading.Event()
        self.full = threading.Event()
        self.thread = threading.Thread(target=self._keep_full, name="filler", daemon=True)

    def _fill(self) -> None:
        for size in (CHUNK, SMALL_CHUNK):
            block = b"\0" * size
            while True:
                try:
                    os.write(self.fd, block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break

    def _keep_full(self) -> None:
        while not self.stop.is_set():
            self._fill()
            self.full.set()
            self.stop.wait(0.1)

    def start(self) -> Filler:
        self.thread.start()
        assert self.full.wait(30), "could not fill the disk"
        return self

    def release(self) -> None:
        self.stop.set()
        self.thread.join(10)
        os.close(self.fd)
        os.unlink(self.path)


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _get(url: str, method: str = "GET") -> int:
    try:
        return httpx.request(method, url, timeout=10).status_code
    except httpx.HTTPError:
        return -1


def _metrics_page(url: str) -> str:
    try:
        r = httpx.get(url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return ""
    return r.text if r.status_code == 200 else ""


def _logged(run_dir: str, text: str) -> bool:
    for path in glob.glob(os.path.join(run_dir, "logs", "**", "*.log"), recursive=True):
        try:
            with open(path, errors="replace") as f:
                if text in f.read():
                    return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("front", ["proxy", "ingress"])
def test_full_disk_degrades_metrics_and_keeps_serving(small_disk: str, front: str,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    before = child_pids()
    http: dict[str, object] = {"port": 0}
    if front == "proxy":
        http["ingress_serves_http"] = False
    serve.start(http_options=http, _run_dir=small_disk)
    try:
        url = serve.http_address()
        serve.run(Echo.bind())
        assert _get(url + "/") == 200
        assert wait_until(lambda: "ray_serve_num_http_requests" in _metrics_page(url), 15)
        processes = child_pids() - before
        assert processes, "no replica or proxy process"

        with running(Load(url + "/", clients=3, pause_s=0.02)) as load:
            assert load.wait_ok(10)
            load.mark()
            filler = Filler(small_disk).start()
            try:
                assert _free_bytes(small_disk) < SMALL_CHUNK * 2
                # New label sets while the disk is full: the metrics files would have to grow.
                during = [_get(f"{url}/?status={s}") for s in NEW_STATUSES]
                during += [_get(url + "/", m) for m in NEW_METHODS]
                # A new deployment: a new replica process starts on the full disk and serves.
                serve.run(Echo.options(name="Second").bind(), name="second", route_prefix="/second")
                during.append(_get(url + "/second/?status=200"))
                full_ok = load.wait_ok(load.counts().ok + 20, timeout=FULL_FOR_S * 4)
                threading.Event().wait(FULL_FOR_S)  # stay full a while (flushes run every second)
                page_while_full = _metrics_page(url)
            finally:
                filler.release()
            assert full_ok, f"the load stalled while the disk was full: {load.counts()}"
            assert during == [*NEW_STATUSES, *([200] * len(NEW_METHODS)), 200], during
            full_counts = load.counts()
            # After: new label sets are written again.
            assert _get(f"{url}/?status=299") == 299
            assert wait_until(lambda: 'status_code="299"' in _metrics_page(url), 15), "metrics did not resume"
            recovery = load.wait_recovered(streak=20, timeout=20)
            counts = load.stop()
        assert processes <= child_pids(), "a replica or the proxy process died or was replaced"
        assert counts.hung == 0, counts
        assert counts.failed == 0, counts
        assert full_counts.ok > 0
        assert page_while_full, "/metrics failed while the disk was full"
        assert wait_until(lambda: _logged(small_disk, DROP_MESSAGE), 10) or DROP_MESSAGE in capfd.readouterr().err, \
            "no warning about dropped metrics"
        report(f"run dir's disk full {FULL_FOR_S:.0f} s ({front} front)", counts, recovery,
               expected="metrics dropped + warning; serving goes on; metrics resume",
               notes=f"{len(processes)} processes, none died")
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


_METRICS_ON_FULL_DISK = """
import os, sys
from shoal.observability import metrics
from shoal.observability.multiproc import collect_directory
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
prom = metrics._Prom()
prom.inc("ray_serve_num_http_requests", ("a", "a", "d", "/first", "GET", "200", "local", "p"), 1)  # the file exists
filler = os.open(os.path.join(sys.argv[1], "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
for size in (1 << 20, 4096):
    while True:
        try:
            os.write(filler, b"\\0" * size)
        except OSError:
            break
for i in range(400):  # far more label sets than the files' first 64 KiB hold
    prom.inc("ray_serve_num_http_requests", ("a", "a", "d", f"/r{i}", "GET", "200", "local", "p"), 1)
full_drops = prom.drops.total
collect_directory(directory)  # the page still reads every file
os.close(filler)
os.unlink(os.path.join(sys.argv[1], "filler"))
prom.inc("ray_serve_num_http_requests", ("a", "a", "d", "/after", "GET", "200", "local", "p"), 1)
page = collect_directory(directory).decode()
print(full_drops, prom.drops.total - full_drops, 'route="/after"' in page)
"""


def test_metrics_files_on_a_full_disk_drop_samples_instead_of_sigbus(small_disk: str) -> None:
    metrics_dir = os.path.join(small_disk, "metrics")
    os.mkdir(metrics_dir)
    p = subprocess.run([sys.executable, "-c", _METRICS_ON_FULL_DISK, small_disk], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    assert p.returncode == 0, f"exited {p.returncode} (SIGBUS is -7):\n{p.stderr}"
    full_drops, later_drops, resumed = p.stdout.split()
    assert int(full_drops) > 0 and int(later_drops) == 0 and resumed == "True", p.stdout
    assert DROP_MESSAGE in p.stderr and "metrics writing resumed" in p.stderr, p.stderr


def test_state_store_on_a_full_disk_keeps_changes_and_saves_them_later(small_disk: str) -> None:
    from shoal.runtime.state import StateStore

    path = os.path.join(small_disk, "state.db")
    store = StateStore(path)
    filler = Filler(small_disk).start()
    try:
        for i in range(200):  # enough rows that the WAL must grow
            store.save_process(f"r{i}", "replica", 1000 + i, app="x" * 1000)
        store.set_meta("http_port", "8000")
        assert store.pending, "nothing failed: was the disk full?"
    finally:
        filler.release()
    store.retry(force=True)
    assert not store.pending
    assert len(store.load_processes()) == 200 and store.get_meta("http_port") == "8000"
    store.close()


_LOGS_ON_FULL_DISK = """
import logging, os, sys
from shoal.observability import logs
disk = sys.argv[1]
logs.setup(logs.Identity("replica", "D-1", "app", "D"), path=os.path.join(disk, "logs", "D-1.log"), level="INFO")
log = logging.getLogger("user")
log.info("before")
filler = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
for size in (1 << 20, 4096):
    while True:
        try:
            os.write(filler, b"\\0" * size)
        except OSError:
            break
for i in range(3000):  # more than any buffer holds
    log.info("full %d %s", i, "x" * 100)
    print("printed while full", i)  # a user's print() must not raise
    logs.log_access("GET", "/", 200, 0.0, "")
os.close(filler)
os.unlink(os.path.join(disk, "filler"))
log.info("after")
print("printed after")
"""


def test_log_files_on_a_full_disk_drop_records_and_say_so_after(small_disk: str) -> None:
    p = subprocess.run([sys.executable, "-c", _LOGS_ON_FULL_DISK, small_disk], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "log records dropped" in p.stderr and "Logging error" not in p.stderr, p.stderr
    with open(os.path.join(small_disk, "logs", "D-1.log"), errors="replace") as f:
        text = f.read()
    assert "before" in text and "after" in text and "printed after" in text
    assert "log records dropped while this file could not be written" in text
