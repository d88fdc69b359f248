"""The README's code runs as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
from conftest import Instance

from shoal import serve

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_application_serves(instance: Instance, tmp_path: Path) -> None:
    block = next(b for b in python_blocks() if "app = Api.bind" in b)
    (tmp_path / "readme_app.py").write_text(block)
    sys.path.insert(0, str(tmp_path))
    try:
        import readme_app  # type: ignore[import-not-found]

        handle = serve.run(readme_app.app)
        assert httpx.get(instance.url + "/", params={"x": "21"}).json() == {"y": 42.0}
        model = serve.get_deployment_handle("Model")
        assert model.predict.remote(1.5).result() == 3.0
        assert serve.status().applications["default"].deployments["Model"].replica_states == {"RUNNING": 2}
        assert handle.deployment_name == "Api"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("readme_app", None)
