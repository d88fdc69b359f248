"""``gRPCOptions``: the gRPC ingress's options (Ray Serve's ``ray.serve.config.gRPCOptions``).

Re-exported by :mod:`shoal.config` (and used as ``gRPCOptionsSchema`` in config files). The
model only checks the shape of what it is given; :meth:`gRPCOptions.servicer_functions` imports
the functions (in the process that starts shoal, and again in the proxy process), with errors
that name the field.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from pydantic import Field, PositiveFloat, field_validator

from shoal._model import Strict

__all__ = ["DEFAULT_GRPC_PORT", "gRPCOptions", "import_servicer_function"]

#: Ray Serve's default gRPC port.
DEFAULT_GRPC_PORT = 9000

# "package.module.add_FooServicer_to_server" (Ray's form) or "package.module:add_FooServicer_to_server".
_SERVICER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*([.:])[A-Za-z_]\w*")


class gRPCOptions(Strict):
    """Where and what the gRPC ingress serves (Ray Serve's ``gRPCOptions``).

    ``grpc_servicer_functions`` lists the import paths of the ``add_<Service>Servicer_to_server``
    functions that ``grpcio-tools`` generates (``my_pb2_grpc.add_MyServicer_to_server``); each
    RPC method of those services is answered by the method of the same name of the application's
    ingress deployment. With none (the default) no gRPC server starts. ``port`` 0 picks a free
    port (``shoal.api.grpc_address()`` tells which). ``request_timeout_s`` bounds each request
    end to end (``DEADLINE_EXCEEDED`` past it); a client's own deadline is honoured too.
    ``ingress_serves_grpc`` (shoal's) lets each ingress replica of a local instance serve the gRPC
    port itself, next to the proxy, as ``http_options.ingress_serves_http`` does for HTTP.
    """

    port: int = Field(default=DEFAULT_GRPC_PORT, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: PositiveFloat | None = None
    # shoal's: each ingress replica of a local instance serves gRPC on the same port itself
    # (calls for its own application run in-process; docs/grpc.md). False: the proxy only.
    ingress_serves_grpc: bool = True

    @field_validator("grpc_servicer_functions", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str) or not isinstance(v, list | tuple):
            raise ValueError("must be a list of import paths such as 'my_pb2_grpc.add_MyServicer_to_server'")
        for i, path in enumerate(v):
            if not isinstance(path, str) or not _SERVICER_PATH.fullmatch(path.strip()):
                raise ValueError(f"item {i}: expected an import path "
                                 f"'module.add_MyServicer_to_server' (got {path!r})")
        return [p.strip() for p in v]

    @property
    def enabled(self) -> bool:
        """Whether a gRPC server starts: some servicer function is listed."""
        return bool(self.grpc_servicer_functions)

    @property
    def grpc_servicer_func_callable(self) -> list[Callable[..., Any]]:
        """The servicer functions, imported (Ray's attribute of the same name)."""
        return self.servicer_functions()

    def servicer_functions(self, field: str = "grpc_options.grpc_servicer_functions") -> list[Callable[..., Any]]:
        """Import every servicer function; a ``ValueError`` names the entry that cannot be used."""
        return [import_servicer_function(path, f"{field}[{i}]") for i, path in enumerate(self.grpc_servicer_functions)]


def import_servicer_function(path: str, field: str) -> Callable[..., Any]:
    """The function ``path`` names (``module.function`` or ``module:function``), or a
    ``ValueError`` that starts with ``field`` and says why it cannot be used."""
    module_name, _, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{field}: cannot import module {module_name!r} for {path!r}: {e}. The module generated "
                         "by grpcio-tools must be importable where shoal starts (put its folder on sys.path "
                         "or PYTHONPATH)") from None
    except Exception as e:
        raise ValueError(f"{field}: importing {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None:
        found = sorted(n for n in dir(module) if n.startswith("add_") and n.endswith("_to_server"))
        hint = f"; it has {', '.join(found)}" if found else ""
        raise ValueError(f"{field}: module {module_name!r} has no {attr!r}{hint}")
    if not callable(fn):
        raise ValueError(f"{field}: {path!r} is not a function")
    return fn  # type: ignore[no-any-return]
