"""A detached instance: `shoal start` / `deploy` / `status` / `delete` / `shutdown`, a controller
killed with -9 and restarted under load, and canary releases (split, stickiness, promote,
rollback) -- all through the real command line, with real processes and HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import wait_until

APP = textwrap.dedent('''
    import os
    from starlette.requests import Request
    from shoal import serve
    from shoal.handle import DeploymentHandle

    @serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=5)
    class Word:
        def __init__(self, word: str) -> None:
            self.word = word

        def get(self) -> str:
            return self.word

    @serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=5)
    class Front:
        def __init__(self, word: DeploymentHandle) -> None:
            self.word = word

        async def __call__(self, request: Request) -> dict:
            return {"word": await self.word.get.remote(), "pid": os.getpid()}

    v1 = Front.bind(Word.bind("v1"))
    v2 = Front.bind(Word.bind("v2"))
''')


def config(import_path: str, name: str = "echo", extra: str = "") -> str:
    return f"applications:\n- name: {name}\n  route_prefix: /\n  import_path: {import_path}\n{extra}"


@dataclass
class Detached:
    dir: Path
    address: str
    pids: set[int] = field(default_factory=set)

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SHOAL_RUN_DIR": self.address}
        p = subprocess.run([sys.executable, "-m", "shoal.cli", *args], cwd=self.dir, env=env, capture_output=True,
                           text=True, timeout=timeout)
        if check:
            assert p.returncode == 0, f"shoal {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        return p

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    @property
    def url(self) -> str:
        return str(self.status()["http_address"])

    def controller_pid(self) -> int:
        return int((Path(self.address) / "controller.pid").read_text())

    def recorded_pids(self) -> set[int]:
        """The processes the controller has recorded in state.db (replicas and proxy)."""
        db = Path(self.address) / "state.db"
        if not db.exists():
            return set()
        with sqlite3.connect(db) as conn:
            return {int(p) for (p,) in conn.execute("SELECT pid FROM processes")}

    def remember_pids(self) -> None:
        """Note every process of the instance, so teardown can stop whatever survives."""
        try:
            self.pids.add(self.controller_pid())
        except OSError:
            pass
        self.pids.update(self.recorded_pids())


def _alive_shoal(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"shoal" in f.read()
    except OSError:
        return False


@pytest.fixture
def detached(run_dir: str) -> Iterator[Detached]:
    d = Path(run_dir) / "proj"
    d.mkdir()
    (d / "wordapp.py").write_text(APP)
    (d / "v1.yaml").write_text(config("wordapp:v1"))
    (d / "v2.yaml").write_text(config("wordapp:v2"))
    inst = Detached(d, os.path.join(run_dir, "inst"))
    inst.cli("start", "-p", "0")
    inst.remember_pids()
    try:
        yield inst
    finally:
        inst.remember_pids()
        inst.cli("shutdown", check=False)
        for pid in inst.pids:  # whatever a failed test left behind, by pid
            if _alive_shoal(pid):
                os.kill(pid, signal.SIGKILL)


class Load:
    """Bounded steady HTTP load from a few threads; every request must get a 200."""

    def __init__(self, url: str, threads: int = 3, session: bool = False, keepalive: bool = True) -> None:
        self.url = url
        self.words: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.deadline = time.monotonic() + 120  # bounded, whatever happens
        self.keepalive = keepalive
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, i: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=5 if self.keepalive else 0)
        with httpx.Client(base_url=self.url, limits=limits, timeout=30) as client:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                try:
                    r = client.get("/")
                    if r.status_code == 200:
                        self.words.append(r.json()["word"])
                    else:
                        self.failures.append(f"HTTP {r.status_code}: {r.text}")
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                time.sleep(0.002)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        assert wait_until(lambda: len(self.words) > 30, 30), self.failures
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def more(self, n: int = 50) -> None:
        base = len(self.words)
        assert wait_until(lambda: len(self.words) > base + n, 30), self.failures


def test_deploy_is_declarative_and_idempotent(detached: Detached) -> None:
    out = detached.cli("deploy", "v1.yaml").stdout
    assert "echo: created" in out and "echo: RUNNING" in out
    st = detached.status()
    version = st["applications"]["echo"]["version"]
    processes = detached.recorded_pids()
    served_by = {httpx.get(detached.url + "/").json()["pid"] for _ in range(20)}
    assert served_by and served_by <= processes
    # The same file again changes nothing: same version, same replica processes.
    assert "echo: unchanged" in detached.cli("deploy", "v1.yaml").stdout
    assert detached.status()["applications"]["echo"]["version"] == version
    assert detached.recorded_pids() == processes
    assert {httpx.get(detached.url + "/").json()["pid"] for _ in range(20)} <= processes
    # A second app in the file is created; an app left out of the file is deleted.
    (detached.dir / "two.yaml").write_text(
        "applications:\n"
        "- name: other\n  route_prefix: /other\n  import_path: wordapp:v2\n")
    out = detached.cli("deploy", "two.yaml").stdout
    assert "other: created" in out and "echo: deleted" in out
    assert wait_until(lambda: "echo" not in detached.status()["applications"], 30)
    assert httpx.get(detached.url + "/other/").json()["word"] == "v2"
    # delete, then a deploy that fails to import keeps what runs and names the problem.
    detached.cli("delete", "other")
    assert detached.status()["applications"] == {}
    (detached.dir / "bad.yaml").write_text(config("wordapp:nope"))
    bad = detached.cli("deploy", "bad.yaml", check=False)
    assert bad.returncode == 2 and "nope" in bad.stderr
    (detached.dir / "badfield.yaml").write_text(config("wordapp:v1", extra="  deployments:\n  - name: Word\n"
                                                                           "    num_replicas: -1\n"))
    bad = detached.cli("deploy", "badfield.yaml", check=False)
    assert bad.returncode == 2 and "num_replicas" in bad.stderr


def test_start_refuses_a_second_instance_and_status_reports_it(detached: Detached) -> None:
    again = detached.cli("start", "-p", "0", check=False)
    assert again.returncode != 0 and "already running" in again.stderr
    assert (Path(detached.address) / "state.db").stat().st_mode & 0o777 == 0o600
    assert (Path(detached.address) / "controller.log").exists()


def test_controller_killed_and_restarted_under_load_loses_nothing(detached: Detached) -> None:
    detached.cli("deploy", "v1.yaml")
    detached.remember_pids()
    url = detached.url
    old_controller = detached.controller_pid()
    before = detached.status()["applications"]["echo"]
    with Load(url) as load:
        os.kill(old_controller, signal.SIGKILL)
        load.more(100)  # replicas and proxy keep serving without a controller
        detached.cli("start", "-p", "0")
        detached.remember_pids()
        assert wait_until(lambda: detached.status()["applications"]["echo"]["status"] == "RUNNING", 30)
        load.more(100)
    print(f"controller restart under load: {len(load.words)} requests, {len(load.failures)} failed")
    assert load.failures == []
    assert set(load.words) == {"v1"}
    after = detached.status()
    assert after["http_address"] == url  # same port: the proxy handed its socket over
    app = after["applications"]["echo"]
    assert app["version"] == before["version"]
    assert {d["replica_states"].get("RUNNING") for d in app["deployments"].values()} == {2}
    # The replicas were adopted, not replaced: the ingress pids did not change.
    log = (Path(detached.address) / "controller.log").read_text()
    assert "adopting 4 running replica(s)" in log


def test_canary_split_stickiness_promote_and_rollback(detached: Detached) -> None:
    detached.cli("deploy", "v1.yaml")
    out = detached.cli("deploy", "v2.yaml", "--canary", "20").stdout
    assert "canary started with 20% of traffic" in out
    url = detached.url
    # The measured split over 1,000 requests is within a few points of the weight.
    with httpx.Client(base_url=url, timeout=30) as client:
        words = Counter(client.get("/").json()["word"] for _ in range(1000))
        share = words["v2"] / 1000
        print(f"canary split over 1000 requests: {dict(words)} ({share:.1%} to the canary at 20%)")
        assert 0.16 <= share <= 0.24
        # Sticky per x-session-id: each session always sees one version.
        for sid in ("alice", "bob", "carol", "dave"):
            seen = {client.get("/", headers={"x-session-id": sid}).json()["word"] for _ in range(15)}
            assert len(seen) == 1
    st = detached.status()["applications"]["echo"]
    assert st["canary"]["weight"] == 20 and st["canary"]["status"] == "RUNNING"
    assert st["canary"]["version"] != st["version"]
    # Per-version metrics: both versions counted the requests they served.
    assert wait_until(lambda: detached.status()["applications"]["echo"]["canary"]["metrics"]["requests"] > 100, 10)
    text = detached.cli("status").stdout
    assert "canary release" in text and "requests" in text
    # A plain deploy while a canary runs is refused with the way out named.
    refused = detached.cli("deploy", "v1.yaml", check=False)
    assert refused.returncode != 0 and "shoal promote echo" in refused.stderr

    # Rollback under load: nothing fails, and afterwards only v1 answers.
    with Load(url, keepalive=False) as load:
        detached.cli("rollback", "echo")
        load.more(100)
    print(f"rollback under load: {len(load.words)} requests, {len(load.failures)} failed")
    assert load.failures == []
    assert detached.status()["applications"]["echo"].get("canary") is None
    assert {httpx.get(url + "/").json()["word"] for _ in range(30)} == {"v1"}

    # Promote under load: the app rolls to v2 with zero failed requests.
    detached.cli("deploy", "v2.yaml", "--canary", "50")
    with Load(url, keepalive=False) as load:
        detached.cli("promote", "echo")
        load.more(100)
    print(f"promote under load: {len(load.words)} requests, {len(load.failures)} failed")
    assert load.failures == []
    assert load.words[-1] == "v2"
    st = detached.status()["applications"]["echo"]
    assert st.get("canary") is None and st["status"] == "RUNNING"
    assert {httpx.get(url + "/").json()["word"] for _ in range(30)} == {"v2"}
    assert "echo: unchanged" in detached.cli("deploy", "v2.yaml").stdout


def test_state_survives_a_full_crash(detached: Detached) -> None:
    """Controller and every replica killed (a reboot, say): the next start redeploys the apps
    from the state file, and the canary weight with them."""
    detached.cli("deploy", "v1.yaml")
    detached.cli("deploy", "v2.yaml", "--canary", "30")
    detached.remember_pids()
    for pid in detached.pids:
        if _alive_shoal(pid):
            os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not any(_alive_shoal(p) for p in detached.pids), 10)
    detached.cli("start", "-p", "0")
    detached.remember_pids()
    assert wait_until(lambda: (a := detached.status()["applications"].get("echo")) is not None
                      and a["status"] == "RUNNING" and (a.get("canary") or {}).get("status") == "RUNNING", 60)
    st = detached.status()["applications"]["echo"]
    assert st["canary"]["weight"] == 30
    words = Counter(httpx.get(detached.url + "/").json()["word"] for _ in range(60))
    assert words["v1"] > 0 and words["v2"] > 0
    # shutdown forgets the state: the next start is empty.
    detached.cli("shutdown")
    detached.cli("start", "-p", "0")
    detached.remember_pids()
    assert detached.status()["applications"] == {}
