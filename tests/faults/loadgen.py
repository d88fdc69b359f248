"""A steady load generator for the fault suite: counts ok / failed / hung requests per fault.

:class:`Load` runs ``clients`` closed-loop HTTP clients (each an ``httpx.Client`` with
keep-alive connections, in its own thread) against one URL until stopped. Every request
has a deadline (``hung_after_s``): a request still unanswered then counts as **hung** — the
outcome the suite exists to rule out. A request answered with a non-2xx status, or whose
connection fails before its deadline, counts as **failed**; a 2xx as **ok**.

A test marks the moment it injects a fault (:meth:`Load.mark`), waits for the load to run
clean again (:meth:`Load.wait_recovered`), and files a row in the suite's table
(:func:`report`): fault -> ok / failed / hung and the recovery time. The table is printed
at the end of the run (tests/conftest.py) and written to
``$SHOAL_FAULT_TABLE`` when set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import httpx

OK = "ok"
FAILED = "failed"
HUNG = "hung"


@dataclass
class Outcome:
    """One request: when it started and ended (monotonic), and how it went."""

    started: float
    ended: float
    kind: str  # OK, FAILED or HUNG
    detail: str = ""  # the status code or the exception, for failures


@dataclass
class Counts:
    ok: int = 0
    failed: int = 0
    hung: int = 0
    details: dict[str, int] = field(default_factory=dict)  # failure detail -> how many

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.hung


class Load:
    """``clients`` closed-loop clients sending ``method`` requests to ``url``.

    ``pause_s`` is each client's think time between requests (keeps the machine's two cores
    for the system under test). ``request`` can replace the default request (a callable
    taking the thread's client and returning the response).
    """

    def __init__(self, url: str, clients: int = 4, hung_after_s: float = 20.0, pause_s: float = 0.01,
                 method: str = "GET", body: bytes | None = None,
                 request: Callable[[httpx.Client], httpx.Response] | None = None,
                 ok: Callable[[httpx.Response], bool] | None = None) -> None:
        self.url = url
        self.clients = clients
        self.hung_after_s = hung_after_s
        self.pause_s = pause_s
        self.method = method
        self.body = body
        self.request = request
        self.is_ok = ok or (lambda r: 200 <= r.status_code < 300)
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.marked = 0.0

    # -- running
    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> Counts:
        """Stop the clients (each finishes its request in flight, bounded by ``hung_after_s``)
        and return the counts since the last :meth:`mark` (all, without one)."""
        self.stopping.set()
        for t in self.threads:
            t.join(self.hung_after_s + 10)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"load clients did not stop: {alive}"
        return self.counts()

    def _client(self) -> None:
        timeout = httpx.Timeout(self.hung_after_s)
        with httpx.Client(timeout=timeout) as client:
            while not self.stopping.is_set():
                t0 = time.monotonic()
                try:
                    if self.request is not None:
                        r = self.request(client)
                    else:
                        r = client.request(self.method, self.url, content=self.body)
                    kind = OK if self.is_ok(r) else FAILED
                    detail = "" if kind == OK else str(r.status_code)
                except httpx.TimeoutException as e:
                    elapsed = time.monotonic() - t0
                    kind = HUNG if elapsed >= self.hung_after_s * 0.95 else FAILED
                    detail = type(e).__name__
                except httpx.HTTPError as e:
                    kind, detail = FAILED, type(e).__name__
                self._note(Outcome(t0, time.monotonic(), kind, detail))
                if self.pause_s:
                    self.stopping.wait(self.pause_s)

    def _note(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    # -- reading
    def mark(self) -> float:
        """Note now as the moment a fault is injected; counts and recovery are measured from it."""
        self.marked = time.monotonic()
        return self.marked

    def since(self, t: float | None = None) -> list[Outcome]:
        """Requests that ended after ``t`` (default: the last mark)."""
        t = self.marked if t is None else t
        with self.lock:
            return [o for o in self.outcomes if o.ended >= t]

    def counts(self, t: float | None = None) -> Counts:
        c = Counts()
        for o in self.since(t):
            if o.kind == OK:
                c.ok += 1
            elif o.kind == FAILED:
                c.failed += 1
            else:
                c.hung += 1
            if o.detail:
                c.details[o.detail] = c.details.get(o.detail, 0) + 1
        return c

    def wait_ok(self, n: int = 1, timeout: float = 30.0) -> bool:
        """Wait until ``n`` requests succeeded since the last mark."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.counts().ok >= n:
                return True
            time.sleep(0.02)
        return False

    def wait_recovered(self, streak: int = 20, timeout: float = 60.0) -> float | None:
        """Wait until the load runs clean again: ``streak`` successes in a row (by end time)
        after the mark, with nothing failed or hung after them. Returns the recovery time (from
        the mark to the first success of that streak), or None when it did not recover."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            recovered = self.recovery()
            if recovered is not None and recovered[1] >= streak:
                return recovered[0]
            time.sleep(0.05)
        return None

    def recovery(self) -> tuple[float, int] | None:
        """(seconds from the mark to the first success after the last bad request, successes
        since), or None when no success came after the last bad request."""
        outcomes = sorted(self.since(), key=lambda o: o.ended)
        last_bad = max((i for i, o in enumerate(outcomes) if o.kind != OK), default=-1)
        clean = outcomes[last_bad + 1:]
        if not clean:
            return None
        first = clean[0]
        # With no bad request at all the load never stopped: recovery is 0.
        return (0.0 if last_bad < 0 else max(0.0, first.ended - self.marked)), len(clean)


@contextmanager
def running(load: Load) -> Iterator[Load]:
    """Run ``load`` for the duration of the block (stopped even when the block fails)."""
    load.start()
    try:
        yield load
    finally:
        if not load.stopping.is_set():
            load.stop()


# -- what the fault tests read of processes
def rss_bytes(pid: int) -> int:
    """A process's resident memory (VmRSS), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def proxy_pid() -> int:
    """The pid of the local instance's proxy process."""
    from shoal import api

    assert api._instance is not None
    proxy = api._instance.controller.proxy
    assert proxy is not None
    return int(proxy.proc.pid)


# -- the suite's table
@dataclass
class Row:
    fault: str
    ok: int
    failed: int
    hung: int
    recovery_s: float | None
    expected: str = ""  # what "holds" means for this fault, in a few words
    notes: str = ""


TABLE: list[Row] = []


def report(fault: str, counts: Counts, recovery_s: float | None, expected: str = "", notes: str = "") -> Row:
    """File a row in the suite's table (printed at the end of the run)."""
    row = Row(fault, counts.ok, counts.failed, counts.hung,
              None if recovery_s is None else round(recovery_s, 2), expected, notes)
    TABLE.append(row)
    path = os.environ.get("SHOAL_FAULT_TABLE")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(asdict(row)) + "\n")
    return row


def format_table(rows: list[Row]) -> str:
    """The table as Markdown."""
    lines = ["| fault | ok | failed | hung | recovery (s) | expected |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        rec = "—" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        lines.append(f"| {r.fault} | {r.ok} | {r.failed} | {r.hung} | {rec} | {r.expected} |")
    return "\n".join(lines)
