"""What an HTTP front needs of ``HTTPOptions``, as plain data."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


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

    @classmethod
    def of(cls, http: Any) -> FrontOptions:
        """The front's options; API keys from the environment or a file are read now.
        Files are made absolute: replicas change to their app's directory."""
        def path(p: str | None) -> str:
            return os.path.abspath(p) if p else ""

        return cls(root_path=http.root_path, request_timeout_s=http.request_timeout_s,
                   keep_alive_timeout_s=http.keep_alive_timeout_s,
                   max_request_body_bytes=http.max_request_body_bytes, max_header_bytes=http.max_header_bytes,
                   api_keys=http.resolved_api_keys(), auth=http.auth or "",
                   ssl_keyfile=path(http.ssl_keyfile), ssl_certfile=path(http.ssl_certfile),
                   ssl_keyfile_password=http.ssl_keyfile_password or "", ssl_ca_certs=path(http.ssl_ca_certs),
                   dashboard=bool(getattr(http, "dashboard", True)))
