"""How a child process of the controller (a replica, a proxy) stays tied to its parent.

Kept apart from the replica and the proxy so both can use it without importing each other.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ORPHAN_TIMEOUT_S", "die_with_parent"]

# How long a replica of a detached instance keeps serving without a controller, waiting for a
# restarted one to adopt it, before it exits ($SHOAL_ORPHAN_TIMEOUT_S).
ORPHAN_TIMEOUT_S = float(os.environ.get("SHOAL_ORPHAN_TIMEOUT_S", "600"))


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM us when the parent goes away; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
