"""prometheus-client's multiprocess directory: the files each process writes, which of those
processes still live, and the merged page.

**A full disk.** prometheus-client memory-maps each process's file and grows it with
``truncate``, which makes a sparse file: on a full disk the first write to a page that has no
block behind it kills the process with SIGBUS. :func:`install_safe_files` replaces its file
class with ``SafeMmapedDict`` (:func:`safe_dict_class`), which allocates the blocks (``posix_fallocate``) whenever
it creates or grows a file and, when it cannot, raises ``OSError`` instead of growing: the
sample that needed the room is dropped (:class:`Drops` counts it and warns, at most once per
:data:`WARN_EVERY_S`), and the next sample with a new label set tries again, so metrics
resume by themselves when there is space.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import re
import struct
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("shoal.observability.metrics")

_DB_FILE = re.compile(r"^(?P<kind>[a-z]+)_(?:(?P<mode>[a-z]+)_)?(?P<pid>\d+)\.db$")
# prometheus-client's first size of a file (its _INITIAL_MMAP_SIZE), and the header's size.
INITIAL_FILE_BYTES = 1 << 16
_HEADER_BYTES = 8
# At most one warning about dropped samples this often, per process.
WARN_EVERY_S = 60.0
_ZEROS = 1 << 16
# Errors of posix_fallocate that mean "not supported here" (then zeros are written instead).
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})


def process_alive(pid: int) -> bool:
    if os.path.isdir("/proc"):
        from shoal.runtime.processes import is_shoal_process

        return is_shoal_process(pid)  # a zombie or a reused pid counts as gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def db_files(directory: str) -> Iterator[tuple[str, str, str, int]]:
    """(path, kind, gauge mode, pid) of each multiprocess file in ``directory``."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        m = _DB_FILE.match(entry)
        if m is not None:
            yield os.path.join(directory, entry), m.group("kind"), m.group("mode") or "", int(m.group("pid"))


def drop_dead_gauges(directory: str) -> None:
    """Remove the live gauges of processes that are gone (what ``mark_process_dead`` does for one)."""
    for path, kind, mode, pid in db_files(directory):
        if kind == "gauge" and mode.startswith("live") and not process_alive(pid):
            try:
                os.remove(path)
            except OSError:
                pass


class _Files:
    """A collector of the multiprocess files that can be read (a file being created, still
    empty, is skipped rather than failing the whole page)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Any:
        from prometheus_client.multiprocess import MultiProcessCollector

        files = []
        for path, _kind, _mode, _pid in db_files(self.directory):
            try:
                if os.path.getsize(path) >= _HEADER_BYTES:
                    files.append(path)
            except OSError:
                continue
        return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


def collect_directory(directory: str) -> bytes:
    """Every process's metrics from the multiprocess files in ``directory``, merged."""
    from prometheus_client import CollectorRegistry, generate_latest

    drop_dead_gauges(directory)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Files(directory))
    return generate_latest(registry)


def content_type() -> str:
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)


# ---- files with their blocks allocated --------------------------------------------------------


def allocate(fd: int, start: int, end: int) -> None:
    """Give the bytes ``[start, end)`` of ``fd`` real blocks (the file grows to ``end``).
    Raises ``OSError`` (ENOSPC...) when the disk cannot hold them; the file's size is then
    what it was."""
    if end <= start:
        return
    size = os.fstat(fd).st_size
    try:
        try:
            os.posix_fallocate(fd, start, end - start)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            # Write every byte of the range back (zeros past the end): blocks without
            # changing what the file holds.
            pos = start
            while pos < end:
                n = min(_ZEROS, end - pos)
                data = os.pread(fd, n, pos)
                pos += os.pwrite(fd, data + b"\0" * (n - len(data)), pos)
    except OSError:
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        except OSError:
            pass
        raise


def _prepare(filename: str) -> None:
    """Create ``filename`` with :data:`INITIAL_FILE_BYTES` allocated, or allocate the blocks
    of an existing one (sparse, if an older writer made it). On failure no empty file is
    left behind (readers cannot parse one)."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        try:
            allocate(fd, 0, size or INITIAL_FILE_BYTES)
        except OSError:
            if size == 0:
                try:
                    os.unlink(filename)
                except OSError:
                    pass
            raise
    finally:
        os.close(fd)


def _entry_bytes(key: str) -> int:
    """The bytes an entry takes in the file (as ``MmapedDict._init_value`` packs it)."""
    n = len(key.encode("utf-8"))
    padded = n + (8 - (n + 4) % 8)
    return struct.calcsize(f"i{padded}sdd")


def _make_safe_class() -> type:
    from prometheus_client.mmap_dict import MmapedDict

    class SafeMmapedDict(MmapedDict):
        """prometheus-client's ``MmapedDict`` whose every mapped page has a block on disk: no
        write through the mapping can raise SIGBUS. Creating or growing a file on a full disk
        raises ``OSError`` instead."""

        def __init__(self, filename: str, read_mode: bool = False) -> None:
            if not read_mode:
                _prepare(filename)
            super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

        def _init_value(self, key: str) -> None:
            needed = self._used + _entry_bytes(key)
            if needed > self._capacity:
                capacity = self._capacity
                while needed > capacity:
                    capacity *= 2
                allocate(self._f.fileno(), self._capacity, capacity)  # raises: the file stays as it was
                old, self._m = self._m, mmap.mmap(self._f.fileno(), capacity)
                self._capacity = capacity
                try:
                    old.close()
                except BufferError:
                    pass
            super()._init_value(key)  # type: ignore[no-untyped-call]

    return SafeMmapedDict


_safe_class: type | None = None


def safe_dict_class() -> type:
    """:class:`SafeMmapedDict`, made on first use (importing this module does not import
    prometheus-client)."""
    global _safe_class
    if _safe_class is None:
        _safe_class = _make_safe_class()
    return _safe_class


def install_safe_files() -> None:
    """Make prometheus-client's multiprocess values use the safe file class (idempotent; call
    it before the first metric value is created, to cover every file of this process)."""
    from prometheus_client import values

    cls = safe_dict_class()
    if getattr(values, "MmapedDict", None) is not cls:
        setattr(values, "MmapedDict", cls)  # noqa: B010 (a module's global, read at each file's creation)


class Drops:
    """Samples this process could not write into its metrics files (a full disk): counted,
    warned about at most every :data:`WARN_EVERY_S`, and a note when writing works again."""

    def __init__(self, warn_every_s: float = WARN_EVERY_S) -> None:
        self.warn_every_s = warn_every_s
        self.total = 0  # since the process started
        self.pending = 0  # since writing last worked
        self._warned_at = -math.inf

    def dropped(self, error: OSError) -> None:
        self.total += 1
        self.pending += 1
        now = time.monotonic()
        if now - self._warned_at >= self.warn_every_s:
            self._warned_at = now
            logger.warning("metrics samples dropped: cannot write the metrics files in %s (%s); serving goes on "
                           "and metrics resume when there is space (%d dropped so far)",
                           os.environ.get("PROMETHEUS_MULTIPROC_DIR", "?"), error.strerror or error, self.total)

    def written(self) -> None:
        """A new series was written into the files."""
        if self.pending:
            logger.warning("metrics writing resumed in %s; %d metrics samples dropped while it failed",
                           os.environ.get("PROMETHEUS_MULTIPROC_DIR", "?"), self.pending)
            self.pending = 0
