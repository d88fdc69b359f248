"""Ctrl-C in ``shoal run``: say what the stop waits for, and make a second Ctrl-C final.

The first Ctrl-C (or SIGTERM) stops the instance gracefully: replicas drain their requests
(each deployment's ``graceful_shutdown_timeout_s``) or finish their constructor, then stop.
:func:`describe_drain` says which replicas that is and until when, and :class:`DrainWatch`
says it again every few seconds while they are still there, so the terminal never sits silent.

A second Ctrl-C kills every process the instance started (:func:`kill_everything`): the
children of this process, recursively, and any process of the instance directory that
``/proc`` shows (a replica re-parented after its parent died), each by pid with SIGKILL;
then this process exits. Its own listening socket closes with it, so nothing holds the port
and an immediate restart works.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["DrainWatch", "descendants", "describe_drain", "kill_everything", "make_final"]

# The controller gives replicas their longest graceful_shutdown_timeout_s plus this much.
SHUTDOWN_MARGIN_S = 5.0
WATCH_EVERY_S = 3.0
KILL_WAIT_S = 5.0


def waiting_for(controller: Any) -> dict[str, dict[str, int]]:
    """``app/deployment`` -> replica state -> count, of the replicas still there."""
    out: dict[str, dict[str, int]] = {}
    try:
        records = list(controller.replicas.values())
    except RuntimeError:  # changed while read (another thread): nothing said this time
        return out
    for rec in records:
        states = out.setdefault(f"{rec.app}/{rec.deployment}", {})
        state = getattr(rec.state, "value", str(rec.state))
        states[state] = states.get(state, 0) + 1
    return out


def drain_budget(controller: Any) -> float:
    """How long the controller's shutdown lets replicas take, at most (seconds)."""
    try:
        longest = max([d.spec.config.graceful_shutdown_timeout_s for a in list(controller.apps.values())
                       for d in a.deployments.values()] + [0.0])
    except RuntimeError:
        longest = 0.0
    return float(longest) + SHUTDOWN_MARGIN_S


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))


def describe_drain(waiting: dict[str, dict[str, int]], budget_s: float, now_wall: float) -> str:
    """The sentence the first Ctrl-C prints: which replicas the stop waits for, the deadline."""
    if not waiting:
        return "stopping (no replica to drain). Press Ctrl-C again to kill everything now."
    n = sum(sum(s.values()) for s in waiting.values())
    parts = "; ".join(f"{key} ({_states(states)})" for key, states in sorted(waiting.items()))
    until = time.strftime("%H:%M:%S", time.localtime(now_wall + budget_s))
    return (f"stopping: waiting for {n} replica(s) to drain or finish starting: {parts}; "
            f"at most {budget_s:.0f}s (until {until}), then they are killed. "
            "Press Ctrl-C again to kill everything now.")


class DrainWatch:
    """Says every :data:`WATCH_EVERY_S` which replicas the stop still waits for."""

    def __init__(self, controller: Any, say: Callable[[str], None], budget_s: float,
                 every_s: float = WATCH_EVERY_S) -> None:
        self.controller = controller
        self.say = say
        self.deadline = time.monotonic() + budget_s
        self.every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-drain-watch", daemon=True)

    def start(self) -> DrainWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            waiting = waiting_for(self.controller)
            if not waiting:
                continue
            left = max(self.deadline - time.monotonic(), 0.0)
            parts = "; ".join(f"{key} ({_states(states)})" for key, states in sorted(waiting.items()))
            self.say(f"still waiting for {parts}: at most {left:.0f}s more (Ctrl-C kills them now)")


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out |= {int(p) for p in f.read().split()}
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (children, their children ...), from ``/proc``."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        kids = _children(todo.pop()) - out
        out |= kids
        todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[:1]
    except OSError:
        return False
    return state not in ([b"Z"], [b"X"])


def kill_everything(pids: Iterable[int], wait_s: float = KILL_WAIT_S) -> list[int]:
    """SIGKILL each of ``pids`` (by pid); wait up to ``wait_s`` for them to go. The ones left."""
    targets = sorted(set(pids) - {os.getpid()})
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_s
    left = [p for p in targets if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def make_final(instance_pids: Callable[[], list[int]], say: Callable[[str], None]) -> Callable[[int, Any], None]:
    """The handler of the second Ctrl-C (or SIGTERM): kill this process's descendants and the
    instance's processes (``instance_pids``), say which, and exit with status 130."""

    def final(signum: int, frame: Any) -> None:
        pids = descendants(os.getpid())
        try:
            pids |= set(instance_pids())
        except Exception:
            pass
        try:
            say(f"killing {len(pids)} process(es): pids {', '.join(map(str, sorted(pids))) or '-'}")
        except Exception:
            pass
        left = kill_everything(pids)
        if left:
            try:
                say(f"these would not die: {', '.join(map(str, left))}")
            except Exception:
                pass
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(130)

    return final
