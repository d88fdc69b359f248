"""A digest of a pickle that depends on what it holds, not on how the pickler shared objects.

The deployment version (``DeploymentSpec.code_version``) hashes the class and its constructor
arguments pickled by value. Raw pickle bytes also encode object *identity*: a string seen
twice is written once and fetched from the memo the second time. After ``shoal run --reload``
re-imports a module, equal strings can be distinct objects (a module-level
``logging.getLogger(__name__)`` keeps the first import's name while the class's ``__module__``
is the new one), so unchanged code pickled to different bytes and its replicas were restarted.

:func:`pickle_digest` walks the opcodes instead: memoized strings and bytes are hashed by
value wherever they are fetched, other memoized objects by the order they were first seen,
frame boundaries are ignored, and cloudpickle's per-process class tracker ids are masked.
"""

from __future__ import annotations

import hashlib
import pickletools
import re

__all__ = ["pickle_digest"]

_TEXT = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_BYTES = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "SHORT_BINSTRING", "BINSTRING", "STRING"})
_PUT = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_TRACKER = re.compile(r"[0-9a-f]{32}")


_SKELETONS = frozenset({"_make_skeleton_class", "_make_skeleton_enum"})


def _is_tracker_id(ops: list[tuple[pickletools.OpcodeInfo, object, int | None]], i: int) -> bool:
    """A 32-hex string, memoized, then None: the shape of the class tracker id in the arguments
    of cloudpickle's skeleton-class call (only counted while such a call is open)."""
    arg = ops[i][1]
    return (isinstance(arg, str) and _TRACKER.fullmatch(arg) is not None and i + 2 < len(ops)
            and ops[i + 1][0].name == "MEMOIZE" and ops[i + 2][0].name == "NONE")


def pickle_digest(data: bytes) -> bytes:
    """SHA-256 of ``data``'s opcodes with object sharing of strings and bytes undone."""
    h = hashlib.sha256()

    def emit(tag: str, value: object) -> None:
        raw = value if isinstance(value, bytes) else repr(value).encode()
        h.update(f"{tag}:{len(raw)}:".encode())
        h.update(raw)

    ops = list(pickletools.genops(data))
    memo: dict[int, tuple[str, object]] = {}  # memo index → ("str"/"bytes", value) or ("ref", ordinal)
    refs = 0
    last: tuple[str, object] | None = None  # the value the previous opcode pushed, when a string/bytes
    skeletons = 0  # cloudpickle skeleton-class calls whose tracker id is still to come
    for i, (op, arg, _) in enumerate(ops):
        name = op.name
        if name == "FRAME":
            continue
        if name in _PUT:
            index = len(memo) if name == "MEMOIZE" else int(str(arg))
            if last is not None:
                memo[index] = last  # fetched later: hashed as the value again
            else:
                memo[index] = ("ref", refs)
                emit("put", refs)
                refs += 1
            last = None
            continue
        if name in _GET:
            kind, value = memo[int(str(arg))]
            emit("get" if kind == "ref" else kind, value)
            last = None
            continue
        if name in _TEXT:
            tracker = skeletons > 0 and _is_tracker_id(ops, i)
            skeletons -= tracker
            last = ("str", "<class-tracker>" if tracker else arg)
            emit(*last)
            continue
        if name in _BYTES:
            value = arg.encode("latin-1") if isinstance(arg, str) else arg
            last = ("bytes", value)
            emit(*last)
            continue
        if name == "STACK_GLOBAL" and any(ops[j][1] in _SKELETONS for j in range(max(i - 2, 0), i)):
            skeletons += 1
        last = None
        emit(name, arg)
    return h.digest()
