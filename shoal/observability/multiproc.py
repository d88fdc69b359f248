"""prometheus-client's multiprocess directory: the files each process writes, which of those
processes still live, and the merged page."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

_DB_FILE = re.compile(r"^(?P<kind>[a-z]+)_(?:(?P<mode>[a-z]+)_)?(?P<pid>\d+)\.db$")


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


def collect_directory(directory: str) -> bytes:
    """Every process's metrics from the multiprocess files in ``directory``, merged."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    drop_dead_gauges(directory)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def content_type() -> str:
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)
