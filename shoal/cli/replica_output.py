"""Replica output on the ``shoal run`` terminal, as Ray shows it: every line a replica writes
(``print()``, warnings, its log records at the deployment's level, a traceback) prefixed with
its deployment and pid, ``(Embedder pid=1234) ...``.

Replicas already write all of that into their own log file (:mod:`shoal.observability.logs`),
so this tails the files of the current session instead of piping each process: a replica's
output reaches both its file (``shoal logs``) and the terminal, and the detached instance,
which has no terminal, is unchanged. One thread reads and writes whole lines, so lines of two
replicas never mix mid-line; memory stays bounded whatever a replica prints: a file is read
:data:`READ_BYTES` at a time, and a line longer than :data:`MAX_LINE_BYTES` is cut there
(the rest of it is skipped, and the cut is said). Control characters are escaped
(:mod:`shoal.observability.safetext`).

:class:`LineSplitter` is the pure core (bytes in, bounded lines out); :class:`ReplicaOutput`
the shell that finds the files, reads them and prints.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from shoal.observability.safefiles import open_for_reading
from shoal.observability.safetext import escape_line

__all__ = ["MAX_LINE_BYTES", "READ_BYTES", "LineSplitter", "ReplicaOutput", "lock_holders", "replica_files"]

# A line longer than this is cut (the terminal gets its start and how much was left out).
MAX_LINE_BYTES = 16 * 1024
# At most this much of one file is read per poll; the rest waits for the next one.
READ_BYTES = 256 * 1024
POLL_S = 0.2
_PID = re.compile(rb" pid=([0-9]+) ")
# A TEXT record's "<date> <time> <LEVEL> replica <app>/<dep>/<id> pid=<pid> <rest>": the
# prefix names the deployment and pid already, so the line keeps date, time, level and rest.
_WHO = re.compile(r"^(\S+ \S+ [A-Z]+ )replica \S+ pid=[0-9]+ ")


class LineSplitter:
    """Complete lines out of a stream of byte chunks, each at most ``max_line`` bytes: the
    part of a longer line past that is dropped as it arrives (never held), and the line comes
    out cut, with a note saying how many bytes were left out."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self.partial = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl < 0 else nl
            room = self.max_line - len(self.partial)
            take = min(end - start, max(room, 0))
            self.partial += data[start:start + take]
            self.dropped += end - start - take
            if nl < 0:
                break
            out.append(self._line())
            start = nl + 1
        return out

    def flush(self) -> list[str]:
        """What is left of an unfinished last line (the file ended without a newline)."""
        return [self._line()] if self.partial or self.dropped else []

    def _line(self) -> str:
        text = bytes(self.partial).decode("utf-8", "replace")
        if self.dropped:
            text += f" ... [line cut: {self.dropped} more bytes]"
        self.partial.clear()
        self.dropped = 0
        return text


def lock_holders() -> dict[int, int]:
    """inode -> pid of every ``flock`` in ``/proc/locks``: a replica holds one on its log file
    while it lives, which tells whose file it is (its print() lines do not say)."""
    out: dict[int, int] = {}
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] != b"FLOCK":  # (a waiter's line reads "N: -> FLOCK ...")
            continue
        try:
            pid = int(parts[4])
            ino = int(parts[5].rsplit(b":", 1)[-1])
        except ValueError:
            continue
        out.setdefault(ino, pid)
    return out


@dataclass
class _Tail:
    path: str
    key: str  # "app/deployment"
    f: IO[bytes]
    ino: int
    pid: int = 0
    lines: LineSplitter = field(default_factory=LineSplitter)


class ReplicaOutput:
    """Prints every new line of the files ``files()`` lists, as ``(app/deployment, path)``
    pairs, through ``write`` (one call per line, prefixed with the deployment and the writer's
    pid), until :meth:`stop`. Files that appear later are read from their start; a rotated
    file is read to its end before its successor."""

    def __init__(self, files: Callable[[], list[tuple[str, str]]], write: Callable[[str], None],
                 poll_s: float = POLL_S) -> None:
        self.files = files
        self.write = write
        self.poll_s = poll_s
        self.tails: dict[str, _Tail] = {}
        # "app/deployment" -> (monotonic time, text) of its newest line: the progress display's.
        self.last: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ReplicaOutput:
        self._thread = threading.Thread(target=self._run, name="shoal-replica-output", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop following, after printing what the files hold by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.poll(final=True)
        with self._lock:
            for t in self.tails.values():
                t.f.close()
            self.tails.clear()

    def last_line(self, key: str) -> str | None:
        """The newest non-blank line of deployment ``key`` ("app/deployment"), if any."""
        got = self.last.get(key)
        return got[1] if got else None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # never take the terminal down with it; the files still have everything
                pass

    def poll(self, final: bool = False) -> None:
        with self._lock:
            listed = self.files()
            for key, path in listed:
                if path not in self.tails:
                    self._open(key, path)
            holders: dict[int, int] | None = None
            for path, t in list(self.tails.items()):
                if not t.pid:
                    holders = lock_holders() if holders is None else holders
                    t.pid = holders.get(t.ino, 0)
                self._drain(t, final)
                try:
                    ino = os.stat(path).st_ino
                except OSError:
                    continue  # being rotated: look again next time
                if ino != t.ino:
                    self._drain(t, final=True)
                    t.f.close()
                    del self.tails[path]
                    new = self._open(t.key, path)
                    if new is not None:
                        new.pid = t.pid
                        self._drain(new, final)

    def _open(self, key: str, path: str) -> _Tail | None:
        try:
            f = open(open_for_reading(path), "rb")  # noqa: SIM115 - kept open while following
        except OSError:
            return None
        t = self.tails[path] = _Tail(path, key, f, os.fstat(f.fileno()).st_ino)
        return t

    def _drain(self, t: _Tail, final: bool) -> None:
        data = t.f.read(READ_BYTES)
        lines = t.lines.feed(data) if data else []
        if final:
            while data:
                data = t.f.read(READ_BYTES)
                lines += t.lines.feed(data)
            lines += t.lines.flush()
        for line in lines:
            if not t.pid:
                m = _PID.search(line.encode("utf-8", "replace")[:512])
                t.pid = int(m.group(1)) if m else 0
            text = _WHO.sub(r"\1", escape_line(line), count=1)
            if text.strip():
                self.last[t.key] = (time.monotonic(), text)
            prefix = f"({t.key.split('/', 1)[-1]} pid={t.pid or '?'})"
            for part in _unfold_traceback(text):
                self.write(f"{prefix} {part}")


_TRACEBACK = "\\nTraceback (most recent call last):\\n"


def _unfold_traceback(text: str) -> list[str]:
    """A record that carries a traceback (its newlines written as ``\\n`` in the file, one
    record per line) shown as the lines Python prints, each with the replica's prefix so no
    line can pass for another replica's."""
    if _TRACEBACK not in text:
        return [text]
    return [part for part in text.split("\\n") if part]


def replica_files(logs_dir: Callable[[], str]) -> Callable[[], list[tuple[str, str]]]:
    """The ``files`` of :class:`ReplicaOutput` for the instance whose current log folder
    ``logs_dir()`` names: every replica's file, as ``shoal logs`` finds them."""
    from shoal.cli.logs import catalog

    def files() -> list[tuple[str, str]]:
        return [(key, path) for key, paths in catalog(logs_dir()).items() for path in paths]

    return files
