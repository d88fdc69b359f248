"""Strict request framing: what a front refuses in a request head before anything reads it.

A request whose framing two HTTP parsers could read differently is a smuggling vector: a
proxy in front of shoal that takes ``Transfer-Encoding: identity, chunked`` for a body of
another length than shoal does, or that routes by one of two ``Host`` headers while the
application reads the other, lets a client hide one request inside another. RFC 9112 tells a
server what to do with each, and :func:`head_fault` says it:

* no ``Host`` in an HTTP/1.1 request, or more than one ``Host`` in any request: 400
  (RFC 9112 §3.2);
* ``Transfer-Encoding`` in an HTTP/1.0 request: 400 (§6.1: such a message is faulty framing);
* ``Transfer-Encoding`` together with ``Content-Length``: 400 (§6.1, §6.3);
* ``Transfer-Encoding`` whose codings do not end with exactly one ``chunked``: 400 (§6.3: the
  body's length cannot be determined; duplicates and empty list members included);
* ``Transfer-Encoding`` that ends with ``chunked`` after other codings (``gzip, chunked``,
  ``identity, chunked``): 501, a transfer coding the front does not implement (§6.1).

Only ``chunked`` (any case, surrounding whitespace allowed) is accepted. The check is one pass
over the headers uvicorn has already collected, with a few byte comparisons per header.
"""

from __future__ import annotations

from collections.abc import Sequence

# (status, reason phrase, message) of a refused head.
Fault = tuple[int, str, str]

_CHUNKED = b"chunked"
_OLD_VERSIONS = ("1.0", "0.9")  # versions without Host or Transfer-Encoding


def _bad(text: str) -> Fault:
    return 400, "Bad Request", text


def head_fault(headers: Sequence[tuple[bytes, bytes]], http_version: str) -> Fault | None:
    """Why a request head with ``headers`` (lower-case names, as uvicorn collects them) and
    ``http_version`` (``"1.1"``, ``"1.0"``) must be refused, or None when its framing is sound."""
    hosts = 0
    coding: bytes | None = None  # every Transfer-Encoding line, joined as one list
    length = False
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"transfer-encoding":
            coding = value if coding is None else coding + b"," + value
        elif name == b"content-length":
            length = True
    old = http_version in _OLD_VERSIONS
    if hosts > 1:
        return _bad("more than one Host header")
    if not hosts and not old:
        return _bad("missing Host header")
    if coding is None:
        return None
    if old:
        return _bad(f"Transfer-Encoding in an HTTP/{http_version} request")
    if length:
        return _bad("both Transfer-Encoding and Content-Length")
    if coding.strip().lower() == _CHUNKED:
        return None
    codings = [c.strip().lower() for c in coding.split(b",")]
    if codings[-1] != _CHUNKED or codings.count(_CHUNKED) > 1 or b"" in codings:
        return _bad("Transfer-Encoding must be chunked")
    return 501, "Not Implemented", "transfer coding not implemented (only chunked is)"
