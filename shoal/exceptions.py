"""shoal's error hierarchy. Every class here pickles across processes.

    RayServeException                 base of everything shoal raises (Ray's name kept)
    ├── BackPressureError             a caller's queue for a deployment is full
    ├── DeploymentUnavailableError    the deployment is gone or cannot start
    ├── RequestCancelledError         the request was cancelled or timed out
    ├── ReplicaDiedError              the replica serving the request died (alias ActorDiedError)
    ├── gRPCStatusError               a gRPC method's error with the status code it set
    ├── RayTaskError                  mixin base of re-raised user exceptions
    ├── ConfigError (ValueError)      a config file or dict is unreadable or invalid
    ├── PolicyLoadError (ValueError)  an autoscaling ``policy`` import path cannot be used
    ├── CompileError (ValueError)     the app cannot be compiled to Kubernetes objects
    ├── ObjectInvalid (ValueError)    a Kubernetes object does not match its schema
    ├── SimError (RuntimeError)       the Kubernetes simulation failed or timed out
    ├── InstanceNotFoundError         no shoal instance directory fits what was asked
    ├── PodConfigError                a Kubernetes pod cannot serve (config, app or deployment)
    ├── NestedInstanceError (RuntimeError)  serve.run/start inside a process shoal started
    ├── DeployError (RuntimeError)    an application could not be deployed
    ├── NotSupportedError (NotImplementedError)  a Ray Serve name shoal does not support
    └── ControllerError (RuntimeError)  the controller refused or failed an admin call

A user exception raised inside a replica reaches the caller as an instance of a class that
derives from *both* the user's exception class and :class:`RayTaskError`, so
``except ValueError`` still catches a remote ``ValueError`` and the message carries the
remote traceback.

The classes shown with a builtin base (in parentheses) derived from it before they moved
here, and still do, so ``except ValueError`` / ``except RuntimeError`` keep catching them;
the modules they came from re-export their names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

__all__ = [
    "ActorDiedError",
    "BackPressureError",
    "CompileError",
    "ConfigError",
    "ControllerError",
    "DeployError",
    "DeploymentUnavailableError",
    "InstanceNotFoundError",
    "NestedInstanceError",
    "NotSupportedError",
    "ObjectInvalid",
    "PodConfigError",
    "PolicyLoadError",
    "RayServeException",
    "RayTaskError",
    "ReplicaDiedError",
    "RequestCancelledError",
    "SimError",
    "gRPCStatusError",
]


class RayServeException(Exception):
    """Base class of shoal's own errors (named as in Ray Serve for compatibility)."""


class BackPressureError(RayServeException):
    """Raised when ``max_queued_requests`` requests already wait for a deployment."""

    def __init__(self, num_queued_requests: int = 0, max_queued_requests: int = 0, message: str = "") -> None:
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.message = message or (
            f"Request dropped due to backpressure (num_queued_requests={num_queued_requests}, "
            f"max_queued_requests={max_queued_requests})."
        )
        super().__init__(num_queued_requests, max_queued_requests, self.message)

    def __str__(self) -> str:
        return self.message


class DeploymentUnavailableError(RayServeException):
    """The deployment was deleted, failed to deploy, or its instance shut down."""


class RequestCancelledError(RayServeException):
    """The request was cancelled (by the caller, a client disconnect or a timeout)."""

    def __init__(self, request_id: str = "", message: str = "") -> None:
        self.request_id = request_id
        self.message = message or f"Request {request_id} was cancelled."
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.message))


class ReplicaDiedError(RayServeException):
    """The replica process died while it held the request."""


ActorDiedError = ReplicaDiedError


class gRPCStatusError(RayServeException):
    """An exception of a deployment method serving a gRPC call, with the status the call answers.

    A method that sets a code on its ``grpc_context`` (other than ``OK``) and then raises makes
    its replica raise this, wrapping the exception: the gRPC client gets that code and the
    details set (not ``INTERNAL``). A method may also raise it itself:
    ``raise gRPCStatusError(KeyError(name), grpc.StatusCode.NOT_FOUND, f"{name} is not known")``.
    ``code`` is a ``grpc.StatusCode`` (None: ``INTERNAL``); ``details`` None means the
    exception's own ``Type: message``. ``str()`` is the original exception's.
    """

    def __init__(self, original_exception: BaseException, code: Any = None, details: str | None = None) -> None:
        self._original_exception = original_exception
        self._grpc_code = code
        self._grpc_details = details
        # What the method set with grpc_context.set_trailing_metadata (filled in by the replica).
        self._trailing_metadata: tuple[tuple[str, Any], ...] = ()
        super().__init__(str(original_exception))

    @property
    def original_exception(self) -> BaseException:
        """The exception the method raised."""
        return self._original_exception

    @property
    def grpc_code(self) -> Any:
        """The status code to answer with (a ``grpc.StatusCode``), or None."""
        return self._grpc_code

    @property
    def grpc_details(self) -> str | None:
        """The details to answer with, or None."""
        return self._grpc_details

    def __str__(self) -> str:
        return str(self._original_exception)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._original_exception, self._grpc_code, self._grpc_details), self.__dict__)


class RayTaskError(RayServeException):
    """Base of exceptions re-raised from a replica. ``cause`` is the original exception."""

    cause: BaseException
    remote_traceback: str

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_task_error, (self.cause, self.remote_traceback))


_derived: dict[type, type] = {}


def _derived_class(cls: type[BaseException]) -> type[BaseException]:
    try:
        return _derived[cls]
    except KeyError:
        pass
    if issubclass(cls, RayTaskError):
        return cls
    try:
        new = type(cls.__name__, (RayTaskError, cls), {"__str__": _task_error_str, "__module__": cls.__module__})
    except TypeError:  # a final or layout-incompatible class: fall back to the base
        new = RayTaskError
    _derived[cls] = new
    return new


def _task_error_str(self: Any) -> str:
    base = self.cause.__str__()
    return f"{base}\n\nTraceback in the replica:\n{self.remote_traceback}" if self.remote_traceback else base


def wrap_remote_exception(exc: BaseException, remote_traceback: str) -> BaseException:
    """Build the exception the caller sees for ``exc`` raised in a replica."""
    if isinstance(exc, RayServeException) and not isinstance(exc, RayTaskError):
        return exc  # shoal's own errors pass through unchanged
    if isinstance(exc, RayTaskError):
        return exc
    cls = _derived_class(type(exc))
    out = cls.__new__(cls)
    out.args = exc.args
    try:
        out.__dict__.update(getattr(exc, "__dict__", {}))
    except (AttributeError, TypeError):
        pass
    out.cause = exc  # type: ignore[attr-defined]
    out.remote_traceback = remote_traceback  # type: ignore[attr-defined]
    return out


def _rebuild_task_error(cause: BaseException, remote_traceback: str) -> BaseException:
    return wrap_remote_exception(cause, remote_traceback)


class ConfigError(RayServeException, ValueError):
    """A config file (or config dict) is unreadable or invalid.

    ``source`` names the file (or ``"<dict>"``); ``problems`` holds ``(field_path, message)``
    pairs, the path being empty for problems of the whole file. ``str()`` gives one line per
    problem, each ``"<source>: <path>: <message>"``.
    """

    def __init__(self, source: str, problems: str | Sequence[tuple[str, str]]) -> None:
        if isinstance(problems, str):
            problems = [("", problems)]
        self.source = source
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        for path, msg in self.problems:
            lines.append(f"{self.source}: {path}: {msg}" if path else f"{self.source}: {msg}")
        return "\n".join(lines) if lines else f"{self.source}: invalid config"

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.source, self.problems))


class PolicyLoadError(RayServeException, ValueError):
    """An autoscaling ``policy`` import path that cannot be used."""


class CompileError(RayServeException, ValueError):
    """The app or the options cannot be compiled to Kubernetes objects; the message names the
    option or field."""


class ObjectInvalid(RayServeException, ValueError):
    """A Kubernetes object does not match its schema; the message names the object and the field."""


class SimError(RayServeException, RuntimeError):
    """The objects cannot be simulated, or a wait timed out (the message says which pods)."""


class InstanceNotFoundError(RayServeException):
    """No shoal instance directory fits what was asked (none running, several, or none there)."""


class PodConfigError(RayServeException):
    """A Kubernetes pod cannot serve: a bad config file, or no such application or deployment."""


class NestedInstanceError(RayServeException, RuntimeError):
    """``serve.run`` / ``serve.start`` called in a replica, pod or scaler process: usually a
    module-level ``serve.run(app)`` in the module that defines the deployments, which every
    process that imports the module runs. Put it under ``if __name__ == "__main__":``."""


class DeployError(RayServeException, RuntimeError):
    """An application could not be deployed; the message says which deployment and why.
    (Also a ``RuntimeError``, which it was before it joined this hierarchy.)"""


class ControllerError(RayServeException, RuntimeError):
    """An admin call that the controller refused or could not carry out (the CLI prints its
    message). Also a ``RuntimeError``, which it was before it joined this hierarchy."""


class NotSupportedError(RayServeException, NotImplementedError):
    """A Ray Serve name that shoal does not support (``shoal.serve.get_deployment_actor``, ...).

    Raised instead of an ``AttributeError`` when such a name is looked up on one of shoal's
    mirror modules, so that code ported from Ray fails with the reason rather than a typo-like
    error; the message names the Ray name, says why and points to ``docs/compatibility.md``.
    (Also a ``NotImplementedError``: it is the builtin meaning of "not available here".)"""


if not TYPE_CHECKING:  # hidden from mypy, which would accept any name here

    def __getattr__(name: str) -> Any:
        # A Ray Serve name that shoal does not support raises NotSupportedError with the reason, not an
        # AttributeError (the table is shoal/_compat.py, imported only here: this module stays light;
        # the import system's probes such as __path__ do not load it).
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from shoal._compat import missing_attribute

        return missing_attribute(__name__, name, NotSupportedError)
