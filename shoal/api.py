"""The functions behind ``shoal.serve``: start, run, status, delete, shutdown, handles."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from shoal.config import HTTPOptions, gRPCOptions
from shoal.deployment import Application, build_app_spec, format_validation_error
from shoal.exceptions import NestedInstanceError, RayServeException
from shoal.handle import DeploymentHandle
from shoal.observability import tracing as _tracing
from shoal.runtime import backend as _backend
from shoal.runtime.backend import LoopThread
from shoal.runtime.client import ControllerClient
from shoal.runtime.rundir import RunDir
from shoal.runtime.wire import Role, new_secret
from shoal.status import ServeStatus

if TYPE_CHECKING:
    # Imported where they are used: a replica imports this module (its deployments' modules
    # import ``shoal.serve``) and never starts a controller or a local-mode backend.
    from shoal.runtime.controller import Controller, Settings
    from shoal.runtime.local import LocalBackend

__all__ = [
    "DEFAULT_APP_NAME",
    "delete",
    "get_app_handle",
    "get_deployment_handle",
    "grpc_address",
    "http_address",
    "ingress",
    "run",
    "shutdown",
    "shutdown_async",
    "start",
    "status",
    "wait_for_shutdown",
]

logger = logging.getLogger("shoal")

DEFAULT_APP_NAME = "default"
_DEFAULT: Any = object()


@dataclass
class _Instance:
    loop: LoopThread
    controller: Controller
    client: ControllerClient
    settings: Settings
    # The instance directory's lock when this call took it (None: `shoal run` in this process holds it).
    dir_lock: Any = None


_lock = threading.RLock()
_instance: _Instance | None = None
_local: LocalBackend | None = None
_local_loop: LoopThread | None = None


def _ensure_logging() -> None:
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _parse_http_options(http_options: HTTPOptions | dict[str, Any] | None) -> HTTPOptions:
    if http_options is None:
        return HTTPOptions()
    if isinstance(http_options, HTTPOptions):
        return http_options
    try:
        return HTTPOptions(**http_options)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, "http_options")) from None


def _parse_grpc_options(grpc_options: gRPCOptions | dict[str, Any] | None) -> gRPCOptions | None:
    """The gRPC options, with their servicer functions imported and read now: a problem is a
    ``ValueError`` naming the field before anything starts."""
    if grpc_options is None:
        return None
    if isinstance(grpc_options, gRPCOptions):
        opts = grpc_options
    else:
        try:
            opts = gRPCOptions(**grpc_options)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, "grpc_options")) from None
    if opts.enabled:
        import importlib.util

        if importlib.util.find_spec("grpc") is None:
            raise ValueError("grpc_options.grpc_servicer_functions: the gRPC ingress needs grpcio; "
                             "install it with `pip install 'shoal[grpc]'`")
        from shoal.runtime.grpc_methods import load_methods

        load_methods(list(zip(opts.grpc_servicer_functions, opts.servicer_functions(), strict=True)))
    return opts


def start(
    http_options: HTTPOptions | dict[str, Any] | None = None,
    *,
    grpc_options: gRPCOptions | dict[str, Any] | None = None,
    detached: bool = False,
    proxy: bool = True,
    num_gpus: int | None = None,
    strict_cpus: bool = False,
    _run_dir: str | None = None,
    **_compat: Any,
) -> None:
    """Start the instance in this process (controller thread, HTTP proxy). Idempotent.

    ``grpc_options`` (a :class:`~shoal.config.gRPCOptions` or its dict) starts the gRPC
    ingress in the proxy process, on the HTTP host; its servicer functions are imported here
    first, so a wrong import path fails now, naming the field.

    shoal extensions: ``num_gpus`` declares GPUs instead of asking ``nvidia-smi``;
    ``strict_cpus`` refuses to place replicas whose ``num_cpus`` exceed the machine's.
    """
    global _instance
    _refuse_nested("start")
    with _lock:
        from shoal.runtime.controller import Controller, Settings
        from shoal.runtime.httpguard import exposure_warning

        opts = _parse_http_options(http_options)
        grpc = _parse_grpc_options(grpc_options)
        if _instance is not None:
            if http_options is not None and opts != _instance.settings.http:
                logger.warning("shoal is already running with other http_options; keeping the running ones")
            if grpc_options is not None and grpc != _instance.settings.grpc:
                logger.warning("shoal is already running with other grpc_options; keeping the running ones")
            return
        _ensure_logging()
        _tracing.setup_from_env("shoal-driver")  # $SHOAL_TRACING: handle calls from here start traces
        run_dir = RunDir(_run_dir) if _run_dir else RunDir.for_new_instance()
        settings = Settings(run_dir=run_dir.path, http=opts, start_proxy=proxy and opts.location != "NoServer"
                            and opts.location != "Disabled", num_gpus=num_gpus, strict_cpus=strict_cpus, grpc=grpc)
        dir_lock = _own(run_dir)
        secret = new_secret()
        run_dir.create_private().write_secret(secret)
        loop = LoopThread().start()
        controller: Controller | None = None
        try:
            async def boot() -> tuple[Controller, ControllerClient]:
                ctl = Controller(settings, secret)
                nonlocal controller
                controller = ctl
                await ctl.start()
                client = ControllerClient(ctl.path, secret, Role.CLIENT, f"driver-{os.getpid()}", loop.loop)
                await client.connect()
                return ctl, client

            ctl, client = loop.run(boot())
        except BaseException:
            if controller is not None:
                try:
                    loop.run(controller.shutdown(), timeout=30)
                except Exception:
                    pass
            loop.stop()
            if dir_lock is not None:
                dir_lock.release()
            raise
        _instance = _Instance(loop, ctl, client, settings, dir_lock)
        _backend.set_current(client)
        atexit.register(shutdown)
        if settings.start_proxy:
            logger.info("shoal is serving HTTP on %s://%s:%d", opts.scheme, opts.host, ctl.http_port)
            if ctl.front.grpc_port:
                logger.info("shoal is serving gRPC on %s", grpc_address())
            warning = exposure_warning(opts)
            if warning:
                logger.warning("%s", warning)


def _own(run_dir: RunDir) -> Any:
    """One instance per directory: take its lock (unless this process, e.g. `shoal run`, holds it);
    a clear error naming the pid of the process that owns it."""
    from shoal.runtime.ownership import InstanceBusyError, held_here

    if held_here(run_dir.path):
        return None
    try:
        return run_dir.lock()
    except InstanceBusyError as e:
        raise RayServeException(str(e)) from None


def _require() -> _Instance:
    if _instance is None:
        raise RayServeException("shoal is not running in this process; call serve.run() or serve.start() first")
    return _instance


def _refuse_nested(op: str) -> None:
    """serve.run/serve.start inside a process shoal started (a replica imports the module that
    defines its deployment, so a module-level ``serve.run(app)`` runs there too): a clear error
    before anything starts, instead of a second instance fighting the first for its port."""
    from shoal import context

    if context._worker_process is not None:
        raise NestedInstanceError(
            f"serve.{op}() was called inside a shoal {context._worker_process} process: shoal imports the module "
            "that defines a deployment in every process that runs it, so a module-level serve.run(...) runs "
            "there too. Put it under `if __name__ == \"__main__\":` (or deploy with `shoal run module:app`)"
        )


def http_address() -> str:
    """The base URL the proxy listens on (useful with ``port=0``)."""
    inst = _require()
    return f"{inst.settings.http.scheme}://{inst.settings.http.host}:{inst.controller.http_port}"


def grpc_address() -> str:
    """Where the gRPC ingress listens, as a channel target (``127.0.0.1:9000``; useful with
    ``grpc_options.port=0``). Raises when shoal serves no gRPC."""
    from shoal.runtime.grpc_methods import target_address

    inst = _require()
    port = inst.controller.front.grpc_port
    if not port:
        raise RayServeException("shoal serves no gRPC: start it with grpc_options=gRPCOptions("
                                "grpc_servicer_functions=[...])")
    return target_address(inst.settings.http.host, port)


def run(
    target: Application,
    blocking: bool = False,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str | None = _DEFAULT,
    logging_config: Any = None,
    _local_testing_mode: bool = False,
    timeout_s: float | None = None,
) -> DeploymentHandle:
    """Deploy ``target`` as application ``name`` and wait until it is running.

    Returns a handle to the app's ingress deployment. Redeploying under the same name
    replaces the app (replicas of changed deployments roll). With ``blocking=True`` the
    call serves until Ctrl-C, then shuts everything down.
    """
    if route_prefix is _DEFAULT:
        route_prefix = "/"
    if _local_testing_mode:
        return _run_local(target, name, route_prefix)
    _refuse_nested("run")
    start()
    inst = _require()
    spec = build_app_spec(target, name, route_prefix)
    inst.loop.run(inst.controller.deploy(spec))
    inst.loop.run(inst.controller.wait_running(name, timeout_s))
    inst.loop.run(inst.controller.wait_proxy())
    handle = DeploymentHandle(spec.ingress, name)
    if blocking:
        wait_for_shutdown()
    return handle


def wait_for_shutdown(poll_s: float = 0.2) -> None:
    """Block until Ctrl-C or ``shoal shutdown``, then shut the instance down."""
    inst = _require()
    try:
        while not inst.controller.shutdown_requested.is_set() and not inst.controller.stopped.is_set():
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


def _run_local(target: Application, name: str, route_prefix: str | None) -> DeploymentHandle:
    global _local, _local_loop
    from shoal.runtime.local import LocalBackend

    with _lock:
        if _local is None:
            _local_loop = LoopThread("shoal-local").start()
            _local = LocalBackend(_local_loop.loop)
            atexit.register(shutdown)
        local, loop = _local, _local_loop
    assert loop is not None
    spec = build_app_spec(target, name, route_prefix,
                          make_handle=lambda dep, app: DeploymentHandle(dep, app, _backend=local))
    loop.run(local.deploy(spec))
    return DeploymentHandle(spec.ingress, name, _backend=local)


async def shutdown_async() -> None:
    """:func:`shutdown` for async code (Ray's ``serve.shutdown_async``): the same shutdown, run
    in a worker thread so the caller's event loop keeps running while replicas stop."""
    await asyncio.to_thread(shutdown)


def shutdown() -> None:
    """Stop every replica and the proxy; no child process is left behind."""
    global _instance, _local, _local_loop
    _detach()
    with _lock:
        inst, _instance = _instance, None
        local, loop, _local, _local_loop = _local, _local_loop, None, None
    if inst is not None:
        if _backend._current is inst.client:
            _backend.set_current(None)
        try:
            inst.loop.run(inst.controller.shutdown(), timeout=120)
        except Exception:
            logger.exception("error during shutdown")
        try:
            inst.loop.run(_close_client(inst.client), timeout=5)
        except Exception:
            pass
        inst.loop.stop()
        try:
            os.unlink(RunDir(inst.settings.run_dir).secret)
        except OSError:
            pass
        if inst.dir_lock is not None:
            inst.dir_lock.release()
    if local is not None and loop is not None:
        try:
            loop.run(local.shutdown(), timeout=60)
        finally:
            loop.stop()


def _detach() -> None:
    """An attached process lets go of the instance (which keeps running: unlike Ray's
    serve.shutdown() from another driver, it is not stopped; `shoal shutdown` does that)."""
    from shoal.runtime import attach

    link = attach.attached()
    if link is not None:
        if _backend._current is link.client:
            _backend.set_current(None)
        attach.detach()


async def _close_client(client: ControllerClient) -> None:
    client.close()


def delete(name: str, _blocking: bool = True) -> None:
    """Delete application ``name`` and stop its replicas."""
    if _local is not None and _local_loop is not None and name in _local.apps:
        _local_loop.run(_local.delete(name))
        return
    inst = _require()
    inst.loop.run(inst.controller.delete(name, wait=_blocking))


def status() -> ServeStatus:
    """Applications → deployments → replica state counts, with Ray Serve's status names."""
    if _instance is None:
        current = _backend._current
        if current is None and _local is None:
            # A plain process: the status of the instance running on this machine, if any.
            current, _ = _try_attach()
        if isinstance(current, ControllerClient):
            # Inside a replica (or the proxy), or attached: the instance's status, from its controller.
            got: ServeStatus = _call_blocking(current, "status")
            return got
        source = getattr(current, "status_source", None)
        if source is not None:  # a Kubernetes pod: the app as cluster DNS shows it (pod/status.py)
            seen: ServeStatus = _run_blocking(getattr(current, "loop", None), source, "status")
            return seen
        return ServeStatus()
    inst = _instance

    async def get() -> ServeStatus:
        return inst.controller.status()

    return inst.loop.run(get())


def _app_info() -> dict[str, tuple[str, str | None]]:
    if _instance is not None:
        inst = _instance

        async def get() -> dict[str, tuple[str, str | None]]:
            return {n: (a.spec.ingress, a.spec.route_prefix) for n, a in inst.controller.apps.items()
                    if not a.deleting}

        return inst.loop.run(get())
    current = _backend._current
    if isinstance(current, ControllerClient):
        # Inside a replica or proxy: ask the controller.
        info: dict[str, tuple[str, str | None]] = _call_blocking(current, "app_info")
        return info
    return {}


def _call_blocking(client: ControllerClient, op: str, **args: Any) -> Any:
    return _run_blocking(client.loop, lambda: client.call(op), op)


def _run_blocking(loop: Any, make: Any, op: str) -> Any:
    """``await make()`` on the process's event loop ``loop`` from a thread that is not running it."""
    import asyncio

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError(f"serve.{op}() blocks; call it from sync code or a thread in a replica")
    return asyncio.run_coroutine_threadsafe(make(), loop).result(30)


def get_app_handle(name: str) -> DeploymentHandle:
    """A handle to the ingress deployment of application ``name``.

    In a process that is not part of an instance, this attaches to the instance running on this
    machine (``$SHOAL_RUN_DIR``, the default one, or the only one), as Ray's handles reach the
    cluster from any driver."""
    if _local is not None and name in _local.apps:
        return DeploymentHandle(_local.apps[name].ingress, name, _backend=_local)
    if _instance is None and _local is None and not isinstance(_backend._current, ControllerClient):
        _attach(f"get a handle to application {name!r}")
    info = _app_info()
    if _local is not None:
        info = {**{n: (a.ingress, None) for n, a in _local.apps.items()}, **info}
    if name not in info:
        known = ", ".join(repr(n) for n in sorted(info)) or "none"
        raise RayServeException(f"Application {name!r} does not exist (running applications: {known}).")
    return DeploymentHandle(info[name][0], name)


def _attach(what: str) -> ControllerClient:
    """Connect this process (neither the one that started shoal nor one of its processes) to
    the instance running on this machine, or a clear error naming what was looked for."""
    client, why = _try_attach()
    if client is None:
        raise RayServeException(
            f"cannot {what}: this process is not connected to a shoal instance, and attaching to a running "
            f"one failed: {why}. Handles work in the process that called serve.start() or serve.run(), inside "
            "deployments, and in any other process of the same user on this machine while an instance runs "
            "(set $SHOAL_RUN_DIR to pick one of several).")
    return client


def _try_attach() -> tuple[ControllerClient | None, str]:
    """(the attached client, "") or (None, why not)."""
    from shoal.runtime.attach import AttachError, attach

    try:
        link = attach()
    except AttachError as e:
        return None, str(e)
    if _backend._current is None:
        _backend.set_current(link.client)
    return link.client, ""


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> DeploymentHandle:
    """A handle to one deployment; inside a replica ``app_name`` defaults to its own app."""
    if app_name is None:
        from shoal.context import _process_replica_ctx, _replica_ctx

        ctx = _replica_ctx.get() or _process_replica_ctx
        app_name = ctx.app_name if ctx is not None else DEFAULT_APP_NAME
    if _local is not None and app_name in _local.apps:
        if deployment_name not in _local.apps[app_name].deployments:
            raise RayServeException(f"Deployment {deployment_name!r} does not exist in application {app_name!r}.")
        return DeploymentHandle(deployment_name, app_name, _backend=_local)
    if _instance is not None:
        app = _instance.controller.apps.get(app_name)
        if app is None:
            raise RayServeException(f"Application {app_name!r} does not exist.")
        if deployment_name not in app.spec.deployments:
            raise RayServeException(f"Deployment {deployment_name!r} does not exist in application {app_name!r}.")
    elif _local is None and not isinstance(_backend._current, ControllerClient):
        _attach(f"get a handle to deployment {deployment_name!r}")
        if app_name not in _app_info():
            raise RayServeException(f"Application {app_name!r} does not exist.")
    return DeploymentHandle(deployment_name, app_name)


def ingress(app: Any) -> Callable[[Any], Any]:
    """Serve an ASGI app (FastAPI, Starlette) from a deployment class.

    Example::

        api = FastAPI()

        @serve.deployment
        @serve.ingress(api)
        class Service:
            @api.get("/hello")
            def hello(self, name: str) -> str:
                return f"hello {name}"
    """

    def decorator(cls: Any) -> Any:
        if not callable(app):
            raise TypeError("serve.ingress expects an ASGI application such as a FastAPI app")
        _make_starlette_state_picklable()
        cls.__shoal_asgi_app__ = app
        return cls

    return decorator


def _make_starlette_state_picklable() -> None:
    """Starlette's ``State`` recurses in ``__getattr__`` when unpickled; give it a reducer.

    The app object travels to replica processes with the class it decorates.
    """
    import copyreg

    try:
        from starlette.datastructures import State
    except ImportError:  # pragma: no cover - starlette is a core dependency
        return

    def reduce_state(state: State) -> tuple[Any, ...]:
        return (State, (dict(state._state),))

    copyreg.pickle(State, reduce_state)
