"""Reused shared-memory segments: the pool a sender writes into, the mappings a receiver keeps.

A fresh segment per message costs more than its copy: every 4 KiB page of a new tmpfs file is
allocated and zeroed on first touch, faulted into both processes and freed again after. So a
local connection's sender keeps a few *pooled* segments (names ``<pid>-p<n>-<hex>``), allocated
once (``posix_fallocate``: a full ``/dev/shm`` is an error here, never a ``SIGBUS`` later) and
mapped once, and the receiver maps each of them once (shared, read-write) and keeps the mapping
for the connection's life. Each message the receiver builds on a pooled segment gets its own
buffer exporter over the mapping; when the last object built on the message is gone (garbage
collected), the exporter's finalizer sends the acknowledgement, and only then may the sender
write into that segment again. So a receiver never sees its arrays change, and the arrays it
gets are writable (a write lands in the segment, which nobody reads again before the
acknowledgement).

The pooled bytes of one process (over all its connections) are at most
``$SHOAL_SHM_POOL_BYTES`` (default 512 MiB; 0: no pool, a fresh segment per message as before).
A message that finds no free segment big enough, and no room to make one, takes a fresh segment.
Free segments too small for a message are dropped to make room (the receiver drops its mapping
when it next maps a new segment and finds the old one's file gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import mmap
import os
import secrets
import stat
import threading
import weakref
from collections.abc import Callable

__all__ = ["DEFAULT_POOL_BYTES", "POOL_ENV", "ByteSetting", "MapCache", "SendPool", "is_pooled", "pool_budget",
           "size_class"]

POOL_ENV = "SHOAL_SHM_POOL_BYTES"
DEFAULT_POOL_BYTES = 512 << 20
_MIN_SEGMENT = 1 << 20
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

_lock = threading.Lock()
_pooled_bytes = 0  # over every pool of this process
_counter = itertools.count(1)


class ByteSetting:
    """A byte count from an environment variable, read again only when the variable changes;
    ``ValueError`` names the variable when it is not a whole number of bytes (0 or more)."""

    def __init__(self, env: str, default: int, zero_means: str) -> None:
        self.env = env
        self.default = default
        self.zero_means = zero_means
        self._seen: tuple[str | None, int] = (None, default)

    def __call__(self) -> int:
        raw = os.environ.get(self.env)
        if raw == self._seen[0]:
            return self._seen[1]
        try:
            value = self.default if raw is None or not raw.strip() else int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{self.env} must be a whole number of bytes, 0 or more ({self.zero_means}), "
                             f"not {raw!r}")
        self._seen = (raw, value)
        return value


#: The most bytes this process keeps in pooled segments (``$SHOAL_SHM_POOL_BYTES``, default 512 MiB).
pool_budget = ByteSetting(POOL_ENV, DEFAULT_POOL_BYTES, "0: no pool of reused shared-memory segments")


def pooled_bytes() -> int:
    """The bytes this process holds in pooled segments now."""
    return _pooled_bytes


def size_class(n: int) -> int:
    """The size of a pooled segment for ``n`` bytes: at least 1 MiB, rounded up to a quarter of
    the power of two below it (so a slightly bigger message next time still fits)."""
    n = max(n, _MIN_SEGMENT)
    step = 1 << max(n.bit_length() - 3, 12)
    return -(-n // step) * step


def is_pooled(name: str) -> bool:
    return "-p" in name


def _give_back(size: int) -> None:
    global _pooled_bytes
    with _lock:
        _pooled_bytes -= size


class _Segment:
    __slots__ = ("busy", "mapping", "size")

    def __init__(self, size: int, mapping: mmap.mmap) -> None:
        self.size = size
        self.mapping = mapping
        self.busy = False


class SendPool:
    """The pooled segments one connection's sender writes into (used from the event loop's thread)."""

    __slots__ = ("_segments",)

    def __init__(self) -> None:
        self._segments: dict[str, _Segment] = {}

    def acquire(self, dfd: int, need: int) -> tuple[str, mmap.mmap] | None:
        """A free segment of at least ``need`` bytes, now busy (made when there is room): its
        name and writable mapping; None when there is none to be had."""
        best: tuple[str, _Segment] | None = None
        for name, seg in self._segments.items():
            if not seg.busy and seg.size >= need and (best is None or seg.size < best[1].size):
                best = name, seg
        if best is None:
            best = self._make(dfd, size_class(need))
            if best is None:
                return None
        best[1].busy = True
        return best[0], best[1].mapping

    def _make(self, dfd: int, size: int) -> tuple[str, _Segment] | None:
        global _pooled_bytes
        budget = pool_budget()
        if size > budget:
            return None
        with _lock:
            room = _pooled_bytes + size <= budget
        if not room:  # drop free segments of this pool that are too small anyway
            for name in [n for n, s in self._segments.items() if not s.busy and s.size < size]:
                self._drop(dfd, name)
            with _lock:
                room = _pooled_bytes + size <= budget
        if not room:
            return None
        with _lock:
            _pooled_bytes += size
        name = f"{os.getpid()}-p{next(_counter)}-{secrets.token_hex(4)}"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except OSError:
            _give_back(size)
            raise
        try:
            os.posix_fallocate(fd, 0, size)  # ENOSPC now rather than SIGBUS on a write
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        except BaseException:
            _unlink(dfd, name)
            _give_back(size)
            raise
        finally:
            os.close(fd)
        seg = _Segment(size, mapping)
        self._segments[name] = seg
        return name, seg

    def _drop(self, dfd: int, name: str) -> None:
        seg = self._segments.pop(name)
        _unlink(dfd, name)
        with contextlib.suppress(BufferError):
            seg.mapping.close()
        _give_back(seg.size)

    def release(self, name: str) -> bool:
        """The receiver let go of segment ``name``: free again. False when it is not one of this pool's."""
        seg = self._segments.get(name)
        if seg is None:
            return False
        seg.busy = False
        return True

    def abandon(self, name: str, dfd: int) -> None:
        """A message written into ``name`` was not sent: remove the segment (the peer may hold it)."""
        if name in self._segments:
            self._drop(dfd, name)

    def names(self, busy: bool) -> set[str]:
        return {n for n, s in self._segments.items() if s.busy == busy}

    def close(self, dfd: int, names: set[str]) -> None:
        """Remove segments ``names`` of this pool (the connection ended)."""
        for name in names & self._segments.keys():
            self._drop(dfd, name)


def _unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)


class MapCache:
    """The receiver's mappings of its peer's pooled segments, each mapped once."""

    __slots__ = ("_maps",)

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, dfd: int, name: str, need: int, loop: asyncio.AbstractEventLoop | None,
             release: Callable[[str], None]) -> memoryview:
        """The first ``need`` bytes of pooled segment ``name``, through an exporter of its own: when
        the last object built on it is gone, ``release(name)`` runs (in ``loop``'s thread)."""
        mapping = self._maps.get(name)
        if mapping is None:
            self._forget_removed(dfd)
            mapping = self._map(dfd, name, need)
            self._maps[name] = mapping
        if need <= 0 or need > len(mapping):
            raise ValueError(f"shared-memory segment {name} is smaller than {need} bytes")
        exporter = (ctypes.c_char * need).from_buffer(mapping)

        def done() -> None:
            if loop is None:
                release(name)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                    loop.call_soon_threadsafe(release, name)

        weakref.finalize(exporter, done).atexit = False
        return memoryview(exporter)

    @staticmethod
    def _map(dfd: int, name: str, need: int) -> mmap.mmap:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < need or need <= 0:
                raise ValueError(f"shared-memory segment {name} is not a {need}-byte file of this user")
            return mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)

    def _forget_removed(self, dfd: int) -> None:
        """Drop the mappings of segments whose sender removed them (it dropped them from its pool)."""
        for name in list(self._maps):
            try:
                os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                del self._maps[name]  # unmapped when the last object built on it is gone
            except OSError:
                pass

    def clear(self) -> None:
        self._maps.clear()
