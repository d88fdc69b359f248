"""What the controller hands a local replica process on its stdin: where the controller is, the
instance secret, the process's id and the inherited sockets. A module of its own, so that the
controller can start replicas without importing the replica runtime."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Bootstrap"]


@dataclass
class Bootstrap:
    controller_path: str
    secret: bytes
    process_id: str  # a replica id, or "spare-<hex>" for a spare
    sys_path: list[str]
    cwd: str
    parent_pid: int
    # Exit with the parent (embedded mode); a detached instance lets replicas be adopted.
    die_with_parent: bool = True
    log_level: str = "INFO"
    # An inherited listening socket: set for ingress replicas that serve HTTP themselves.
    http_fd: int = -1
    http: Any = None  # proxy.FrontOptions
    # The instance's log folder: the replica logs into its own file there (stdout and stderr too).
    log_dir: str = ""
