"""shoal's public serving API, with Ray Serve's names: ``from shoal import serve``."""

from __future__ import annotations

# As with Ray Serve, importing serve makes ``starlette.requests`` reachable as an attribute of
# ``starlette`` (``import starlette`` then ``starlette.requests.Request`` in annotations).
import importlib as _importlib
import typing as _typing

from shoal.api import (
    delete,
    get_app_handle,
    get_deployment_handle,
    http_address,
    ingress,
    run,
    shutdown,
    shutdown_async,
    start,
    status,
)
from shoal.config import AutoscalingConfig, HTTPOptions
from shoal.context import get_replica_context
from shoal.deployment import Application, Deployment, deployment
from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    RequestCancelledError,
)
from shoal.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from shoal.serving.batching import batch
from shoal.serving.multiplex import get_multiplexed_model_id, multiplexed

__all__ = [
    "Application",
    "AutoscalingConfig",
    "BackPressureError",
    "Deployment",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "DeploymentUnavailableError",
    "HTTPOptions",
    "RayServeException",
    "RequestCancelledError",
    "batch",
    "delete",
    "deployment",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "http_address",
    "ingress",
    "multiplexed",
    "run",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
]

_importlib.import_module("starlette.requests")


if not _typing.TYPE_CHECKING:  # hidden from mypy, which would accept any name here

    def __getattr__(name: str) -> _typing.Any:
        # A Ray Serve name that shoal does not support raises NotSupportedError with the reason, not an
        # AttributeError (the table is shoal/_compat.py, imported only here: this module stays light;
        # the import system's probes such as __path__ do not load it).
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from shoal._compat import missing_attribute
        from shoal.exceptions import NotSupportedError

        return missing_attribute(__name__, name, NotSupportedError)
