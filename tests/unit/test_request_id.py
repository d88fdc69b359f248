"""A client's x-request-id reaches logs and the application only when it is a plausible id."""

from __future__ import annotations

import pytest

from shoal.runtime.http.guard import read_head, with_request_id


@pytest.mark.parametrize("given", [b"abc-123", b"0f" * 64, b"req:42/x"])
def test_a_plausible_id_is_kept(given: bytes) -> None:
    headers = [(b"host", b"x"), (b"x-request-id", given)]
    head = read_head(headers, new_id=lambda: "new")
    assert head.given_id and head.request_id == given.decode()
    assert with_request_id(headers, head) == headers


@pytest.mark.parametrize("given", [b"\x1b]0;pwned\x07", b"a b", b"x" * 129, b"", b"caf\xc3\xa9", b"\x9b2J"])
def test_anything_else_is_replaced_and_not_forwarded(given: bytes) -> None:
    headers = [(b"host", b"x"), (b"x-request-id", given)]
    head = read_head(headers, new_id=lambda: "new")
    assert not head.given_id and head.request_id == "new"
    assert with_request_id(headers, head) == [(b"host", b"x"), (b"x-request-id", b"new")]
