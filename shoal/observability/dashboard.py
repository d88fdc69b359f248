"""The read-only dashboard: a page at ``/-/dashboard`` and the JSON it polls, ``/-/status.json``.

Every HTTP front serves both (the proxy process and ingress replicas that accept HTTP
themselves: the same :class:`~shoal.runtime.proxy.ProxyApp`), unless
``http_options.dashboard`` is false, in which case both answer 404. The page is one HTML
file with its script and styles inline (``dashboard.html`` next to this module): no build
step, nothing fetched from elsewhere. It draws each application's call graph as inline SVG
and polls the JSON every second.

The JSON is ``serve.status()`` as a dict, plus for each application its call graph
(``edges``: caller -> callee) and for each deployment the options that size it
(``options``). It leaves out what could be secret: ``user_config`` values (only whether
one is set), ``runtime_env`` (environment variables), constructor arguments, and status
messages beyond their first line (no tracebacks).

Clicking a deployment opens its detail view (``/-/dashboard#/deployment/<app>/<deployment>``,
drawn by the same page), which polls ``/-/deployment.json?app=A&deployment=D``: the
deployment's replicas (id, pid, state, version, age, health), its whole status message, its
recent errors with their tracebacks and the tail of its replicas' logs
(:mod:`shoal.observability.deployment_detail`). Logs and tracebacks can hold secrets, so that
endpoint answers only clients connected from a loopback address (:func:`is_loopback`); others
get 403.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import math
import os
import re
import time
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import parse_qs

__all__ = ["PATHS", "deployment_options", "describe_apps", "detail_query", "is_loopback", "page", "respond",
           "status_document"]

DETAIL_PATH = "/-/deployment.json"
PATHS = frozenset({"/-/dashboard", "/-/status.json", DETAIL_PATH})
# How long the page waits for the controller before it shows "unreachable".
STATUS_TIMEOUT_S = 5.0
MAX_MESSAGE = 300
# The longest application or deployment name /-/deployment.json takes.
MAX_NAME = 1024

_page: tuple[bytes, str] | None = None


class _Front(Protocol):
    """What :func:`respond` needs of a ProxyApp."""

    options: Any
    client: Any


def deployment_options(cfg: Any) -> dict[str, Any]:
    """The options that size and shape a deployment (a ``DeploymentConfig``), as plain data;
    nothing secret (no ``user_config`` value, no ``runtime_env``)."""
    auto = cfg.resolved_autoscaling()
    actor = cfg.ray_actor_options
    lc = cfg.logging_config
    return {
        "num_replicas": cfg.num_replicas if isinstance(cfg.num_replicas, int) else None,
        "autoscaling": None if auto is None else {
            "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests,
        },
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "num_cpus": actor.effective_num_cpus,
        "num_gpus": actor.num_gpus or 0,
        "memory": actor.memory or 0,
        "resources": dict(actor.resources),
        "health_check_period_s": cfg.health_check_period_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
        "has_user_config": cfg.user_config is not None,
        "log_encoding": lc.encoding if lc is not None else "TEXT",
        "access_log": lc.enable_access_log if lc is not None else True,
    }


def describe_apps(specs: Iterable[Any]) -> dict[str, Any]:
    """Each application's graph (``AppSpec``\\ s in, plain data out): ingress, route prefix,
    call edges, and every deployment's :func:`deployment_options`."""
    out: dict[str, Any] = {}
    for spec in specs:
        out[spec.name] = {
            "ingress": spec.ingress,
            "route_prefix": spec.route_prefix,
            "edges": [[a, b] for a, b in spec.edges()],
            "deployments": {name: deployment_options(d.config) for name, d in spec.deployments.items()},
        }
    return out


def _first_line(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    line = text.strip().split("\n", 1)[0]
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 1] + "…"


def _plain(value: Any) -> Any:
    """JSON-safe: infinite latencies (beyond the last histogram bucket) become "+Inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "+Inf" if value > 0 else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def status_document(status: dict[str, Any], graphs: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """``/-/status.json``: the status dict with each app's ``edges`` and each deployment's
    ``options`` merged in, status messages cut to their first line."""
    doc: dict[str, Any] = _plain(status)
    doc["time"] = time.time() if now is None else now
    for name, app in doc.get("applications", {}).items():
        graph = graphs.get(name, {})
        app["message"] = _first_line(app.get("message", ""))
        app["edges"] = graph.get("edges", [])
        options = graph.get("deployments", {})
        for dname, dep in app.get("deployments", {}).items():
            dep["message"] = _first_line(dep.get("message", ""))
            dep["options"] = options.get(dname, {})
        canary = app.get("canary")
        if canary:
            canary["message"] = _first_line(canary.get("message", ""))
            for dep in canary.get("deployments", {}).values():
                dep["message"] = _first_line(dep.get("message", ""))
    return doc


def _csp_hash(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy (only its own inline script and
    styles may run, and it may only fetch from this origin)."""
    global _page
    if _page is None:
        with open(os.path.join(os.path.dirname(__file__), "dashboard.html"), encoding="utf-8") as f:
            html = f.read()
        csp = (f"default-src 'none'; script-src {_csp_hash(html, 'script')}; style-src {_csp_hash(html, 'style')}; "
               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")
        _page = (html.encode(), csp)
    return _page


async def _send(send: Any, status: int, body: bytes, content_type: bytes, request_id: str, head: bool,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff"),
               (b"x-request-id", request_id.encode()), *(extra or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body, "more_body": False})


async def _send_json(send: Any, status: int, doc: Any, request_id: str, head: bool = False,
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, json.dumps(doc).encode(), b"application/json", request_id, head, extra)


def is_loopback(client: Any) -> bool:
    """Whether an ASGI ``scope["client"]`` (``(host, port)``) is a loopback address:
    127.0.0.0/8, ``::1``, or 127.x written as IPv4-mapped IPv6. Anything else (no client, a
    name, another address) is not."""
    if not isinstance(client, (tuple, list)) or not client or not isinstance(client[0], str):
        return False
    try:
        ip = ipaddress.ip_address(client[0].split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def detail_query(query_string: bytes) -> tuple[str, str] | str:
    """``(app, deployment)`` from ``/-/deployment.json``'s query string, or the error naming
    what is missing or malformed."""
    try:
        params = parse_qs(query_string.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          errors="strict", max_num_fields=8)
    except (UnicodeDecodeError, ValueError) as e:
        return f"malformed query string: {e}"
    values = []
    for field in ("app", "deployment"):
        got = params.get(field, [])
        if len(got) != 1 or not got[0]:
            return f"query parameter {field!r} is {'repeated' if len(got) > 1 else 'required'}"
        if len(got[0]) > MAX_NAME:
            return f"query parameter {field!r} is longer than {MAX_NAME} characters"
        values.append(got[0])
    return values[0], values[1]


async def _detail(call: Any, scope: dict[str, Any], send: Any, request_id: str, head: bool) -> None:
    if not is_loopback(scope.get("client")):
        await _send_json(send, 403, {"error": f"{DETAIL_PATH} shows log lines and tracebacks: it answers only "
                                              "clients on this machine (a loopback address)"}, request_id, head)
        return
    query = detail_query(scope.get("query_string", b""))
    if isinstance(query, str):
        await _send_json(send, 400, {"error": query}, request_id, head)
        return
    app, deployment = query
    try:
        doc = await call("deployment_detail", STATUS_TIMEOUT_S, app=app, deployment=deployment)
    except Exception as e:
        await _send_json(send, 503, {"error": f"the controller did not answer: {type(e).__name__}"}, request_id,
                         head, [(b"retry-after", b"1")])
        return
    if doc.get("missing"):
        await _send_json(send, 404, {"error": doc.get("error", "not found"), "app": app, "deployment": deployment},
                         request_id, head)
        return
    await _send_json(send, 200, _plain(doc), request_id, head)


async def respond(front: _Front, path: str, scope: dict[str, Any], send: Any, request_id: str) -> None:
    """Answer a request for one of :data:`PATHS` (read-only: GET and HEAD)."""
    if not getattr(front.options, "dashboard", True):
        await _send_json(send, 404, {"error": "not found", "path": path}, request_id)
        return
    method = scope.get("method", "GET")
    if method not in ("GET", "HEAD"):
        await _send_json(send, 405, {"error": "method not allowed"}, request_id, extra=[(b"allow", b"GET, HEAD")])
        return
    head = method == "HEAD"
    if path == "/-/dashboard":
        body, csp = page()
        await _send(send, 200, body, b"text/html; charset=utf-8", request_id, head,
                    [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
                     (b"referrer-policy", b"no-referrer")])
        return
    call = getattr(front.client, "call", None)
    if call is None:  # e.g. a Kubernetes pod: no controller to ask
        await _send_json(send, 404, {"error": "no instance status here"}, request_id, head)
        return
    if path == DETAIL_PATH:
        await _detail(call, scope, send, request_id, head)
        return
    try:
        status, graphs = await asyncio.gather(call("status", STATUS_TIMEOUT_S), call("app_graphs", STATUS_TIMEOUT_S))
    except Exception as e:  # the controller is away (restarting) or too slow
        await _send_json(send, 503, {"error": f"the controller did not answer: {type(e).__name__}"}, request_id,
                         head, [(b"retry-after", b"1")])
        return
    await _send_json(send, 200, status_document(status.to_dict(), graphs), request_id, head)
