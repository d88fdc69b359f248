"""A user's error as the user should read it: the traceback from the first frame of their code
on (the frames of shoal and of unpickling that led there are noise to them)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import traceback

import cloudpickle

import shoal

# Frames under these directories (shoal, unpickling, the event loop and thread pool that run
# user code), before the first user frame, are dropped.
_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep
                  for m in (shoal, cloudpickle, asyncio, concurrent.futures))
_BOOTSTRAP = ("<frozen importlib", "<frozen runpy")


def _is_own(filename: str) -> bool:
    return filename.startswith(_OWN_DIRS) or filename.startswith(_BOOTSTRAP)


def user_traceback(exc: BaseException) -> str:
    """``exc`` formatted like ``traceback.format_exception``, its outermost stack starting at the
    first frame outside shoal (all frames when none is)."""
    te = traceback.TracebackException.from_exception(exc)
    frames = list(te.stack)
    first = next((i for i, f in enumerate(frames) if not _is_own(f.filename)), None)
    if first:
        te.stack = traceback.StackSummary.from_list(frames[first:])
    return "".join(te.format())


def failure_message(exc: BaseException) -> str:
    """What a replica that failed to start reports: the error on the first line (status lines,
    HTTP 503 bodies show it), then the user's traceback."""
    return f"{type(exc).__name__}: {exc}\n{user_traceback(exc)}".rstrip()
