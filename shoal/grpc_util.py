"""gRPC helpers users import (Ray Serve's ``ray.serve.grpc_util``).

A deployment method called through the gRPC ingress that declares a ``grpc_context``
parameter gets a :class:`RayServegRPCContext`: the request's metadata, and the status code,
details and trailing metadata the answer should carry. It is plain data (it travels from the
proxy to the replica and back with the request), so this module imports nothing of ``grpc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["RayServegRPCContext"]

Metadata = list[tuple[str, Any]]


class RayServegRPCContext:
    """The gRPC context of one request, as Ray Serve's ``RayServegRPCContext``.

    ``set_code`` / ``set_details`` / ``set_trailing_metadata`` decide the answer: a code other
    than ``OK`` answers with that status and details instead of the returned message; trailing
    metadata goes back in either case (with ``request_id`` added). If the method raises, the
    answer is ``INTERNAL`` whatever was set here.
    """

    def __init__(self, invocation_metadata: Iterable[tuple[str, Any]] = (), peer: str = "",
                 method: str = "") -> None:
        self._invocation_metadata: Metadata = [(k, v) for k, v in invocation_metadata]
        self._peer = peer
        self._method = method
        self._code: Any = None
        self._details = ""
        self._trailing_metadata: Metadata = []
        self._compression: Any = None

    def __repr__(self) -> str:
        return f"RayServegRPCContext(method={self._method!r}, code={self._code!r})"

    # -- what the client sent
    def invocation_metadata(self) -> Metadata:
        """The metadata the client sent, as (key, value) pairs."""
        return list(self._invocation_metadata)

    def peer(self) -> str:
        """The client's address, as gRPC writes it (``ipv4:127.0.0.1:50000``)."""
        return self._peer

    def peer_identities(self) -> Sequence[bytes] | None:
        """The client's authenticated identities: None (the ingress does not use TLS)."""
        return None

    def peer_identity_key(self) -> str | None:
        """The auth property identifying the client: None (the ingress does not use TLS)."""
        return None

    def auth_context(self) -> dict[str, Any]:
        """The call's auth context: empty (the ingress does not use TLS)."""
        return {}

    # -- what the answer carries
    def code(self) -> Any:
        """The status code set with :meth:`set_code` (a ``grpc.StatusCode``), or None."""
        return self._code

    def set_code(self, code: Any) -> None:
        """Answer with this ``grpc.StatusCode`` (anything but ``OK`` drops the returned message)."""
        self._code = code

    def details(self) -> str:
        """The details set with :meth:`set_details`."""
        return self._details

    def set_details(self, details: str) -> None:
        """The status message of the answer."""
        self._details = str(details)

    def trailing_metadata(self) -> Metadata:
        """The trailing metadata set with :meth:`set_trailing_metadata`."""
        return list(self._trailing_metadata)

    def set_trailing_metadata(self, trailing_metadata: Iterable[tuple[str, Any]]) -> None:
        """Trailing metadata to send with the answer (the last call wins; ``request_id`` is added)."""
        self._trailing_metadata = [(str(k), v) for k, v in trailing_metadata]

    def set_compression(self, compression: Any) -> None:
        """Accepted for compatibility; the answer is not compressed."""
        self._compression = compression
