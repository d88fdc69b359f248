"""What an HTTP front needs of ``HTTPOptions``, as plain data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shoal.runtime.http.budget import BODY_BUDGET_BYTES, BODY_BUDGET_WAIT_S
from shoal.runtime.http.connections import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_CONNECTIONS, WRITE_TIMEOUT_S
from shoal.runtime.processes import withhold_env


@dataclass(frozen=True)
class FrontOptions:
    """What an HTTP front needs of ``HTTPOptions``: plain data, so that proxy processes
    start without importing pydantic."""

    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float = 5.0
    # Limits, API keys, auth hook and TLS: see HTTPOptions and shoal.runtime.httpguard.
    max_request_body_bytes: int = 100 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    auth: str = ""
    ssl_keyfile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile_password: str = field(default="", repr=False)
    ssl_ca_certs: str = ""
    # /-/dashboard and /-/status.json (shoal.observability.dashboard); off: 404.
    dashboard: bool = True
    # Connection hygiene (shoal.runtime.http.connections): request head, body and response
    # write timeouts, the configured connection cap (the soft open-files limit bounds it) and the drain grace (None: the
    # keep-alive timeout).
    request_header_timeout_s: float = HEADER_TIMEOUT_S
    request_body_timeout_s: float = BODY_TIMEOUT_S
    response_write_timeout_s: float = WRITE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    drain_grace_s: float | None = None
    # Request bodies held at once, and the wait for room (shoal.runtime.http.budget).
    request_body_budget_bytes: int = BODY_BUDGET_BYTES
    request_body_budget_wait_s: float = BODY_BUDGET_WAIT_S

    @classmethod
    def of(cls, http: Any) -> FrontOptions:
        """The front's options; API keys from the environment or a file are read now.
        Files are made absolute: replicas change to their app's directory.

        The keys travel to the front inside these options, so the variable that held them is
        withheld from every process this one starts from now on
        (:func:`shoal.runtime.processes.withhold_env`)."""
        def path(p: str | None) -> str:
            return os.path.abspath(p) if p else ""

        withhold_env(getattr(http, "api_keys_env", None))

        return cls(root_path=http.root_path, request_timeout_s=http.request_timeout_s,
                   keep_alive_timeout_s=http.keep_alive_timeout_s,
                   max_request_body_bytes=http.max_request_body_bytes, max_header_bytes=http.max_header_bytes,
                   api_keys=http.resolved_api_keys(), auth=http.auth or "",
                   ssl_keyfile=path(http.ssl_keyfile), ssl_certfile=path(http.ssl_certfile),
                   ssl_keyfile_password=http.ssl_keyfile_password or "", ssl_ca_certs=path(http.ssl_ca_certs),
                   dashboard=bool(getattr(http, "dashboard", True)), **_hygiene(http), **_uploads(http))


def _hygiene(http: Any) -> dict[str, Any]:
    """The connection hygiene options of ``http`` (an ``HTTPOptions``; older objects may lack them)."""
    names = ("request_header_timeout_s", "request_body_timeout_s", "response_write_timeout_s", "max_connections",
             "drain_grace_s")
    return {name: getattr(http, name) for name in names if hasattr(http, name)}


def _uploads(http: Any) -> dict[str, Any]:
    """The request-body budget options of ``http`` (older objects may lack them)."""
    names = ("request_body_budget_bytes", "request_body_budget_wait_s")
    return {name: getattr(http, name) for name in names if hasattr(http, name)}
