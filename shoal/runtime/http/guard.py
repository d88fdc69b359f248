"""The header step: what a front reads and checks of a request before routing it.

* :func:`read_head` — the headers the request path uses (request id, model id, session,
  content length), in one pass.
* :class:`Guard` — the front's checks, in the proxy's order: the root path, credentials
  (:class:`~shoal.runtime.httpguard.Authenticator`), the body limit while reading the body.
* :func:`forward_scope` — the ASGI scope the application gets.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.runtime.http.budget import BodyLease
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.httpguard import Authenticator
from shoal.runtime.ids import new_request_id

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]

# What read_body answers instead of a body: the status the request ends with.
TOO_LARGE = 413
GONE = 499  # the client disconnected while sending
BUSY = 503  # the front's request-body budget had no room in time (shoal.runtime.http.budget)


# A client's x-request-id is kept when it is a plausible id: 1 to 128 printable ASCII characters,
# no spaces. Anything else (control characters, escape sequences, long strings) is replaced by a
# new id, so that what reaches logs and terminals is never the client's raw bytes.
_CLIENT_ID = re.compile(rb"[!-~]{1,128}")


@dataclass(slots=True)
class RequestHead:
    """What the request path reads of a request's headers."""

    request_id: str  # x-request-id, or a new one
    model_id: str = ""  # serve_multiplexed_model_id
    session: bytes = b""  # x-session-id (sticky canary decisions)
    length: bytes = b""  # content-length, as sent
    given_id: bool = False  # the client sent x-request-id
    chunked: bool = False  # a body of unknown length follows (transfer-encoding)

    @property
    def declared(self) -> int:
        """The declared body length; -1 when the body's length is unknown (or malformed)."""
        return int(self.length) if self.length.isdigit() else -1


def read_head(headers: Sequence[tuple[bytes, bytes]],
              new_id: Callable[[], str] = new_request_id) -> RequestHead:
    """The request's :class:`RequestHead`; a request without ``x-request-id`` gets a new one."""
    request_id = ""
    model_id = ""
    session = b""
    length = b""
    chunked = False
    for k, v in headers:
        if k == b"x-request-id":
            request_id = v.decode("ascii") if _CLIENT_ID.fullmatch(v) else ""
        elif k == b"serve_multiplexed_model_id":
            model_id = v.decode("latin-1")
        elif k == b"x-session-id":
            session = v
        elif k == b"content-length":
            length = v
        elif k == b"transfer-encoding":
            chunked = True
    given = bool(request_id)
    return RequestHead(request_id if given else new_id(), model_id, session, length, given, chunked)


def with_request_id(headers: Sequence[tuple[bytes, bytes]], head: RequestHead) -> list[tuple[bytes, bytes]]:
    """The request's headers, with the request's ``x-request-id``: the client's when it was a
    plausible id, else a new one in place of whatever the client sent."""
    if head.given_id:
        return list(headers)
    out = [(k, v) for k, v in headers if k != b"x-request-id"]
    out.append((b"x-request-id", head.request_id.encode()))
    return out


def strip_root(path: str, root: str) -> str | None:
    """``path`` under the front's ``root_path`` (``"/"`` for the root itself), or None when it
    lies outside it."""
    if not root:
        return path
    if not (path == root or path.startswith(root + "/")):
        return None
    return path[len(root):] or "/"


class Guard:
    """A front's checks before a request reaches an application."""

    __slots__ = ("auth", "limit", "root")

    def __init__(self, options: FrontOptions, auth: Authenticator | None) -> None:
        self.root = options.root_path
        self.limit = options.max_request_body_bytes
        self.auth = auth  # None: requests need no credentials

    async def denied(self, scope: Scope) -> int:
        """0 when the request's credentials let it on, else the status to refuse it with."""
        return 0 if self.auth is None else await self.auth.check(scope)

    def length_refused(self, head: RequestHead) -> bool:
        """The declared ``content-length`` is malformed or over the body limit."""
        length = head.length
        return bool(length) and (not length.isdigit() or int(length) > self.limit)

    async def read_body(self, receive: Receive, declared: int = -1,
                        lease: BodyLease | None = None) -> bytes | bytearray | int:
        """The whole request body, or :data:`TOO_LARGE` past the limit, :data:`GONE` when the
        client disconnects first, :data:`BUSY` when ``lease`` found no room in its budget.

        A body of ``declared`` length (its content-length) is read into a buffer of that size,
        taken from the budget first; one of unknown length takes its share as it grows. The
        body comes back as a ``bytearray`` (not copied into ``bytes``; it is only read).
        """
        limit = self.limit
        if lease is not None and declared > 0:
            if declared > lease.budget.capacity:
                return TOO_LARGE  # could never fit
            if not await lease.cover(declared):
                return BUSY
        body = bytearray(declared) if declared > 0 else bytearray()
        got = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return GONE
            chunk = msg.get("body", b"")
            if chunk:
                end = got + len(chunk)
                if end > limit:
                    return TOO_LARGE
                if lease is not None and end > declared:
                    if end > lease.budget.capacity:
                        return TOO_LARGE
                    if not await lease.cover(end, step=True):
                        return BUSY
                body[got:end] = chunk  # in place while within the declared length
                got = end
            if not msg.get("more_body", False):
                if got < len(body):
                    del body[got:]
                return body  # a bytearray (no copy), read-only from here


def forward_scope(scope: Scope, headers: list[tuple[bytes, bytes]], root_path: str) -> Scope:
    """The ASGI scope the application gets: the client's, with ``root_path`` set to the front's
    root plus the route prefix."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": scope.get("asgi", {}).get("spec_version", "2.3")},
        "http_version": scope.get("http_version", "1.1"),
        "method": scope["method"],
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "raw_path": scope.get("raw_path"),
        "query_string": scope.get("query_string", b""),
        "root_path": root_path,
        "headers": headers,
        "client": scope.get("client"),
        "server": scope.get("server"),
    }
