"""The header step: request head, root path, credentials, body limit, forwarded scope."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from shoal.runtime.http.guard import (
    GONE,
    TOO_LARGE,
    Guard,
    RequestHead,
    forward_scope,
    read_head,
    strip_root,
    with_request_id,
)
from shoal.runtime.http.options import FrontOptions
from shoal.runtime.httpguard import Authenticator


def feed(*messages: dict[str, Any]) -> Callable[[], Awaitable[dict[str, Any]]]:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


def test_read_head_takes_the_headers_the_path_uses() -> None:
    head = read_head([(b"x-request-id", b"rid-1"), (b"serve_multiplexed_model_id", b"m7"),
                      (b"x-session-id", b"s"), (b"content-length", b"12"), (b"other", b"x")],
                     new_id=lambda: "unused")
    assert head == RequestHead("rid-1", "m7", b"s", b"12", True)


def test_a_request_without_an_id_gets_a_new_one_added_to_its_headers() -> None:
    head = read_head([(b"host", b"h")], new_id=lambda: "fresh")
    assert (head.request_id, head.given_id) == ("fresh", False)
    assert with_request_id([(b"host", b"h")], head) == [(b"host", b"h"), (b"x-request-id", b"fresh")]
    given = [(b"x-request-id", b"mine")]
    assert with_request_id(given, read_head(given)) == given
    assert len(read_head([]).request_id) == 16  # the default: 8 random bytes, hex


def test_strip_root() -> None:
    assert strip_root("/a/b", "") == "/a/b"
    assert strip_root("/root", "/root") == "/"
    assert strip_root("/root/a", "/root") == "/a"
    assert strip_root("/rootx", "/root") is None
    assert strip_root("/", "/root") is None


async def test_length_and_body_limits() -> None:
    guard = Guard(FrontOptions(max_request_body_bytes=10), None)
    assert not guard.length_refused(RequestHead("r"))
    assert not guard.length_refused(RequestHead("r", length=b"10"))
    assert guard.length_refused(RequestHead("r", length=b"11"))
    assert guard.length_refused(RequestHead("r", length=b"-1"))
    chunk = {"type": "http.request", "body": b"12345", "more_body": True}
    last = {"type": "http.request", "body": b"67890", "more_body": False}
    assert await guard.read_body(feed(chunk, last)) == b"1234567890"
    assert await guard.read_body(feed(chunk, chunk, last)) == TOO_LARGE
    assert await guard.read_body(feed(chunk, {"type": "http.disconnect"})) == GONE
    assert await guard.read_body(feed({"type": "http.request"})) == b""


async def test_credentials() -> None:
    assert await Guard(FrontOptions(), None).denied({"headers": []}) == 0
    guard = Guard(FrontOptions(), Authenticator(["k" * 16]))
    assert await guard.denied({"headers": []}) == 401
    assert await guard.denied({"headers": [(b"authorization", b"Bearer " + b"k" * 16)]}) == 0


def test_forward_scope_keeps_the_request_and_sets_the_root_path() -> None:
    scope = {"type": "http", "method": "POST", "path": "/api/x", "raw_path": b"/api/x", "query_string": b"q=1",
             "headers": [], "client": ("1.2.3.4", 5), "server": ("s", 80), "asgi": {"spec_version": "2.4"},
             "extra": "dropped"}
    inner = forward_scope(scope, [(b"a", b"b")], "/root/api")
    assert inner["root_path"] == "/root/api"
    assert inner["headers"] == [(b"a", b"b")]
    assert inner["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert (inner["method"], inner["path"], inner["query_string"]) == ("POST", "/api/x", b"q=1")
    assert "extra" not in inner
    assert forward_scope({"method": "GET", "path": "/"}, [], "")["scheme"] == "http"
