"""Fuzzing the config loader: whatever a config file holds, loading it either succeeds or
raises :class:`ConfigError` (a message naming the file), never another exception.

Inputs: arbitrary text, arbitrary YAML-shaped data, a valid config with one value replaced,
removed or added at a random place, byte-level mutations of a valid file, and hand-picked
nasties (deep nesting, recursive aliases, alias bombs, odd tags). Deterministic
(``derandomize=True``) and bounded: each property runs a fixed number of examples.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.schema import ConfigError, ServeDeploySchema, load_config_file

FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

VALID: dict[str, Any] = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "127.0.0.1", "port": 8000, "request_timeout_s": 30, "max_request_body_bytes": 1000000},
    "logging_config": {"encoding": "JSON", "log_level": "INFO"},
    "applications": [
        {
            "name": "app1",
            "route_prefix": "/app1",
            "import_path": "examples.rag.app:app",
            "args": {"model": "small", "k": 3},
            "deployments": [
                {"name": "Model", "num_replicas": 2, "max_ongoing_requests": 8, "user_config": {"t": 0.5},
                 "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25, "resources": {"custom": 1}}},
                {"name": "Api", "autoscaling_config": {"min_replicas": 0, "max_replicas": 4,
                                                        "target_ongoing_requests": 2}},
            ],
        },
        {"name": "app2", "route_prefix": None, "import_path": "pkg.mod.builder"},
    ],
}

counts: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    print(f"\nconfig fuzzing: {sum(counts.values())} inputs {counts}")


def _load_text(text: str, suffix: str = ".yaml") -> str:
    """Load ``text`` as a config file: "ok" or "config-error"; anything else raises."""
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="shoal-fuzz-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        try:
            load_config_file(path)
            return "ok"
        except ConfigError as e:
            assert str(e).startswith(path), e
            return "config-error"
    finally:
        os.unlink(path)


def _load_data(data: Any) -> str:
    try:
        ServeDeploySchema.from_dict(data, source="fuzz.yaml")
        return "ok"
    except ConfigError as e:
        assert str(e).startswith("fuzz.yaml"), e
        return "config-error"


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(sorted({
    "applications", "http_options", "proxy_location", "name", "route_prefix", "import_path", "args",
    "deployments", "num_replicas", "max_ongoing_requests", "max_queued_requests", "autoscaling_config",
    "ray_actor_options", "user_config", "min_replicas", "max_replicas", "num_gpus", "port", "host",
    "api_keys", "ssl_certfile", "auth", "logging_config", "log_level", "grpc_options", "target_capacity",
})) | st.text(max_size=10)


@FUZZ
@given(st.text(max_size=300))
def test_any_text(text: str) -> None:
    counts["text"] = counts.get("text", 0) + 1
    _load_text(text)


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("{}[]:,-?&*!|>'\"#%@`\n\t aeio0123.~<=")), max_size=120))
def test_yaml_punctuation(text: str) -> None:
    counts["yaml-punctuation"] = counts.get("yaml-punctuation", 0) + 1
    _load_text(text)
    _load_text(text, ".json")


@FUZZ
@given(st.dictionaries(field_names, values, max_size=5))
def test_any_document(data: dict[str, Any]) -> None:
    counts["documents"] = counts.get("documents", 0) + 1
    _load_data(data)
    _load_text(yaml.safe_dump(data))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(VALID) if p]


@FUZZ
@given(st.sampled_from(ALL_PATHS), st.sampled_from(["replace", "delete", "add"]), values, field_names)
def test_mutated_valid_config(path: tuple[Any, ...], how: str, value: Any, new_key: str) -> None:
    counts["mutations"] = counts.get("mutations", 0) + 1
    data = copy.deepcopy(VALID)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "replace":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][new_key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    else:
        parent[last] = [parent[last], value]
    _load_data(data)
    _load_text(yaml.safe_dump(data))
    _load_text(json.dumps(data), ".json")


VALID_TEXT = yaml.safe_dump(VALID)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_TEXT)), st.integers(0, 3), st.text(max_size=4)),
                min_size=1, max_size=4))
def test_byte_mutations_of_a_valid_file(edits: list[tuple[int, int, str]]) -> None:
    counts["text-mutations"] = counts.get("text-mutations", 0) + 1
    text = VALID_TEXT
    for pos, cut, insert in edits:
        text = text[:pos] + insert + text[pos + cut:]
    _load_text(text)


def test_the_valid_config_is_valid() -> None:
    assert _load_data(VALID) == "ok" and _load_text(VALID_TEXT) == "ok"


NASTY = {
    "deep lists": "applications: " + "[" * 1100 + "]" * 1100,
    "deep mappings": "applications:\n" + "".join("  " * i + "a:\n" for i in range(1500)),
    "deep flow mappings": "x: " + "{a: " * 1100 + "1" + "}" * 1100,
    "deep args": "applications: [{import_path: a.b, args: " + "[" * 900 + "]" * 900 + "}]",
    "recursive alias": "applications: &a [*a]",
    "recursive args": "applications: [{import_path: a.b, args: &x {k: *x}}]",
    "recursive user_config": "applications: [{import_path: a.b, deployments: [{name: D, user_config: &x [*x]}]}]",
    "alias bomb": "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [{','.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)
    ) + "applications: [{import_path: a.b, args: {bomb: *g}}]",
    "integer of 5000 digits": "http_options: {port: 1" + "0" * 5000 + "}\napplications: [{import_path: a.b}]",
    "python object tag": "applications: !!python/object/apply:os.system [echo owned]",
    "binary import path": "applications: [{import_path: !!binary aGVsbG8=}]",
    "timestamp name": "applications: [{import_path: a.b, name: 2001-12-14}]",
    "non-string key": "{1: 2, applications: [{import_path: a.b}]}",
    "list as key": "? [a, b]\n: 1\napplications: [{import_path: a.b}]",
    "bad merge": "applications: [{<<: 5, import_path: a.b}]",
    "NUL byte": "applications: [{import_path: a.b}]\x00",
    "a set": "applications: !!set {a, b}",
    "NaN port": "http_options: {port: .nan}\napplications: [{import_path: a.b}]",
    "lone surrogate": "applications: [{import_path: \"a.b\\ud800\"}]",
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_documents(name: str) -> None:
    counts["nasty"] = counts.get("nasty", 0) + 1
    assert _load_text(NASTY[name]) == "config-error"


def test_nasty_json() -> None:
    assert _load_text("[" * 100_000 + "]" * 100_000, ".json") == "config-error"
    assert _load_text('{"applications": [{"import_path": "a.b", "args": {"n": 1' + "0" * 5000 + "}}]}",
                      ".json") == "config-error"
