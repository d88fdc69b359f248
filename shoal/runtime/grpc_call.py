"""How a request from the gRPC ingress reaches a deployment method, replica side.

The gRPC front (:mod:`shoal.runtime.grpc_front`) calls the ingress deployment's method like a
handle does, with one extra keyword argument, :data:`GRPC_KWARG`: the request's
:class:`~shoal.grpc_util.RayServegRPCContext`. :func:`prepare` takes it out again and hands it
to the method as ``grpc_context`` when the method declares that parameter; the answer goes
back wrapped in a :class:`GRPCReply` with the context (code, details, trailing metadata the
method set). A streamed answer ends with one such reply after its last item.

A method that raises after setting a code other than ``OK`` on its context raises a
:class:`~shoal.exceptions.gRPCStatusError` instead (:func:`failure`): the client gets that
code, the details set, and the trailing metadata set, rather than ``INTERNAL``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import cloudpickle

from shoal.exceptions import RayServeException, gRPCStatusError
from shoal.grpc_util import RayServegRPCContext

__all__ = ["GRPC_KWARG", "GRPCReply", "failure", "prepare", "reply"]

GRPC_KWARG = "__shoal_grpc_context__"
_PARAMETER = "grpc_context"


class GRPCReply:
    """A deployment method's answer to a gRPC request, with the request's context."""

    __slots__ = ("context", "result")

    def __init__(self, result: Any, context: RayServegRPCContext) -> None:
        self.result = result
        self.context = context

    def __reduce__(self) -> tuple[Any, ...]:
        return (GRPCReply, (self.result, self.context))


def _declares_context(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get(_PARAMETER)
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def prepare(fn: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[dict[str, Any], RayServegRPCContext | None]:
    """``kwargs`` without :data:`GRPC_KWARG` (plus ``grpc_context`` when ``fn`` declares it),
    and the request's context; ``(kwargs, None)`` for a request that did not come over gRPC."""
    if GRPC_KWARG not in kwargs:
        return kwargs, None
    kwargs = dict(kwargs)
    context = kwargs.pop(GRPC_KWARG)
    if _declares_context(fn):
        kwargs[_PARAMETER] = context
    return kwargs, context


def reply(result: Any, context: RayServegRPCContext | None) -> Any:
    """What goes back to the caller: ``result``, wrapped with the context for a gRPC request."""
    return result if context is None else GRPCReply(result, context)


def _is_ok(code: Any) -> bool:
    """Whether ``code`` (as ``set_code`` took it: a ``grpc.StatusCode``, its number or name) is OK."""
    value = getattr(code, "value", code)
    if isinstance(value, tuple) and value:
        value = value[0]
    return value == 0 or (isinstance(value, str) and value.upper() == "OK")


def _portable(exc: BaseException) -> BaseException:
    """``exc`` when it pickles, else a RayServeException with its type and message (the
    wrapper must reach the proxy whatever the method raised)."""
    try:
        cloudpickle.dumps(exc)
        return exc
    except Exception:
        return RayServeException(f"{type(exc).__name__}: {exc}")


def failure(exc: BaseException, context: RayServegRPCContext | None) -> BaseException:
    """What a method that raised ``exc`` while serving a gRPC request raises instead: a
    :class:`~shoal.exceptions.gRPCStatusError` carrying the code, details and trailing metadata
    set on ``context`` when the code is not ``OK``; ``exc`` itself otherwise (also for a
    ``gRPCStatusError`` the method raised, which keeps its own code; the context's trailing
    metadata goes with it)."""
    if context is None:
        return exc
    if isinstance(exc, gRPCStatusError):
        if not exc._trailing_metadata:
            exc._trailing_metadata = tuple(context.trailing_metadata())
        return exc
    code = context.code()
    if code is None or _is_ok(code):
        return exc
    out = gRPCStatusError(_portable(exc), code, context.details() or None)
    out._trailing_metadata = tuple(context.trailing_metadata())
    out.__traceback__ = exc.__traceback__
    return out
