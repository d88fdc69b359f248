"""Processes: a server is one session; its members are found in /proc and stopped by pid."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    start: int  # start time in clock ticks since boot: tells a pid apart from a reused one
    name: str


def proc_table() -> dict[int, ProcInfo]:
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ... starttime(22nd field)"; comm may hold spaces and parens.
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        table[int(entry)] = ProcInfo(int(entry), int(fields[1]), int(fields[3]), int(fields[19]), name)
    return table


def session_procs(root: int) -> dict[int, ProcInfo]:
    """``root`` and every process descending from it or sharing its session (``root`` leads it)."""
    table = proc_table()
    members = {pid: p for pid, p in table.items() if p.sid == root or pid == root}
    frontier = list(members)
    while frontier:
        parent = frontier.pop()
        for pid, p in table.items():
            if p.ppid == parent and pid not in members:
                members[pid] = p
                frontier.append(pid)
    return members


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]), idle


def background_cpu(seconds: float = 0.5) -> float:
    """Fraction of the whole machine's CPU busy over ``seconds`` (taken while none of our servers run)."""
    t1, i1 = _cpu_jiffies()
    time.sleep(seconds)
    t2, i2 = _cpu_jiffies()
    return 0.0 if t2 == t1 else 1 - (i2 - i1) / (t2 - t1)


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_label(pid: int, comm: str) -> str:
    """A readable name: the comm, or for a Python process the script or module it runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return comm
    if not comm.startswith("python") or len(argv) < 2:
        return comm
    rest = [a for a in argv[1:] if a not in ("-u", "-B")]
    if rest and rest[0] == "-m" and len(rest) > 1:
        return rest[1]
    if rest and rest[0] == "-c":
        return "python -c " + (rest[1].split(";")[0][:40] if len(rest) > 1 else "")
    return os.path.basename(rest[0]) if rest else comm


def alive(p: ProcInfo) -> bool:
    now = proc_table().get(p.pid)
    return now is not None and now.start == p.start


def cpu_ticks(pids: dict[int, ProcInfo]) -> dict[tuple[int, int], int]:
    """utime + stime (clock ticks) of each process, keyed by (pid, start time)."""
    out = {}
    for pid, p in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[(pid, p.start)] = int(fields[11]) + int(fields[12])
    return out

