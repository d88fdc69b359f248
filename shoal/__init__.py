"""shoal: Ray Serve's programming model, no cluster on one machine, Kubernetes beyond it.

Import the serving API as ``from shoal import serve``. This module stays import-light:
replica processes import it on start-up.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "serve"]


def __getattr__(name: str) -> Any:
    if name == "serve":
        import importlib

        return importlib.import_module("shoal.serve")
    raise AttributeError(name)
