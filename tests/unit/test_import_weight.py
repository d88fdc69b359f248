"""What importing ``shoal.serve`` loads: a replica process imports it (the module that defines a
deployment imports ``shoal.serve``), so the controller and the local-testing backend, which only
``serve.start``/``serve.run`` need, are imported when those run, not with the module."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, sys
import shoal.serve
before = sorted(m for m in sys.modules if m.startswith("shoal.runtime.controller") or m == "shoal.runtime.local")
from shoal import serve

@serve.deployment
def f() -> str:
    return "ok"

handle = serve.run(f.bind(), _local_testing_mode=True)
assert handle.remote().result() == "ok"
after_local = "shoal.runtime.local" in sys.modules
print(json.dumps({"before": before, "after_local": after_local}))
"""


def test_serve_import_leaves_controller_and_local_backend_for_later() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["before"] == [], f"importing shoal.serve loaded {got['before']}"
    assert got["after_local"] is True  # serve.run(_local_testing_mode=True) imports it when called
