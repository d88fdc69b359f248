"""A child's environment (shoal.runtime.processes.child_env): the parent's plus what the
controller adds, without the variables withheld (the API keys variable)."""

from __future__ import annotations

import pytest

from shoal.runtime import processes


def test_withheld_variables_never_reach_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "_WITHHELD", set())
    monkeypatch.setenv("SHOAL_TEST_CHILD_SECRET", "k1")
    monkeypatch.setenv("SHOAL_TEST_CHILD_PLAIN", "p")
    assert processes.child_env()["SHOAL_TEST_CHILD_SECRET"] == "k1"
    processes.withhold_env("SHOAL_TEST_CHILD_SECRET", None, "")
    env = processes.child_env({"PROMETHEUS_MULTIPROC_DIR": "/tmp/m", "SHOAL_TEST_CHILD_SECRET": "k2"})
    assert "SHOAL_TEST_CHILD_SECRET" not in env  # not even when passed explicitly
    assert env["SHOAL_TEST_CHILD_PLAIN"] == "p" and env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/m"
