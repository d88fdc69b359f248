"""The route table: longest-prefix matching, the canary split, sticky sessions."""

from __future__ import annotations

from shoal.runtime.http.routes import RouteTable, canary_share


def test_longest_prefix_wins_and_root_matches_everything() -> None:
    table = RouteTable({"/": ("root", "R"), "/api": ("api", "A"), "/api/v2": ("v2", "V")})
    assert table.match("/api/v2/x") == ("/api/v2", "v2", "V")
    assert table.match("/api/v2") == ("/api/v2", "v2", "V")
    assert table.match("/api") == ("/api", "api", "A")
    assert table.match("/api/v20") == ("/api", "api", "A")  # a prefix matches whole path segments only
    assert table.match("/apix") == ("/", "root", "R")
    assert table.match("/") == ("/", "root", "R")


def test_no_match_without_a_root_route() -> None:
    table = RouteTable({"/api": ("api", "A")})
    assert table.match("/other") is None
    assert table.match("/ap") is None
    assert RouteTable().match("/") is None


def test_listing_and_targets_include_canaries() -> None:
    table = RouteTable({"/": ("a", "A"), "/b": ("b", "B")}, {"/": ("a#canary", "A2", 10.0)})
    assert table.listing() == {"/b": "b", "/": "a"}
    assert sorted(table.targets()) == [("a", "A"), ("a#canary", "A2"), ("b", "B")]


def test_canary_takes_requests_below_its_weight() -> None:
    shares = iter([5.0, 50.0, 9.99, 10.0])
    table = RouteTable({"/": ("a", "A"), "/b": ("b", "B")}, {"/": ("a2", "A2", 10.0)}, share=lambda s: next(shares))
    route = table.match("/x")
    assert route is not None
    assert [table.target(route, b"") for _ in range(4)] == [("a2", "A2"), ("a", "A"), ("a2", "A2"), ("a", "A")]
    other = table.match("/b")
    assert other is not None
    assert table.target(other, b"") == ("b", "B")  # no split on /b: the share is not even drawn
    assert next(shares, None) is None


def test_sessions_stick_to_one_version() -> None:
    table = RouteTable({"/": ("a", "A")}, {"/": ("a2", "A2", 30.0)})
    route = ("/", "a", "A")
    for i in range(50):
        session = f"user-{i}".encode()
        first = table.target(route, session)
        assert all(table.target(route, session) == first for _ in range(5))
        assert first == (("a2", "A2") if canary_share(session) < 30.0 else ("a", "A"))


def test_canary_share_is_a_stable_hash_in_range() -> None:
    values = [canary_share(f"s{i}".encode()) for i in range(2000)]
    assert all(0.0 <= v < 100.0 for v in values)
    assert canary_share(b"s1") == values[1]
    below = sum(v < 25.0 for v in values) / len(values)
    assert 0.2 < below < 0.3  # roughly uniform
    assert 0.0 <= canary_share(b"") < 100.0


def test_of_routes_keeps_the_first_of_two_routes_with_one_prefix() -> None:
    table = RouteTable.of_routes([("/", "first", "F"), ("/x", "x", "X"), ("/", "second", "S")])
    assert table.match("/y") == ("/", "first", "F")
    assert table.match("/x/1") == ("/x", "x", "X")
