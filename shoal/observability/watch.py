"""``shoal status --watch``: a live terminal view of a running instance.

Every refresh asks the instance for its status (the same as ``shoal status --json``) and
redraws one table per application: each deployment's status, replicas by state against its
target, requests per second (from the growth of its request counter over the last few
seconds), latency percentiles, errors, and a canary release if one is in progress.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["Rates", "run", "view"]

RATE_WINDOW_S = 5.0


class Rates:
    """Requests per second from cumulative counters sampled over time.

    A counter that goes down (a new version's replicas started counting afresh) starts over.
    """

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._seen: dict[str, deque[tuple[float, int]]] = {}

    def update(self, key: str, now: float, count: int | None) -> float | None:
        """Record ``count`` at ``now``; the rate over the window, or None until two samples."""
        if count is None:
            return None
        samples = self._seen.setdefault(key, deque())
        if samples and count < samples[-1][1]:
            samples.clear()
        samples.append((now, count))
        while len(samples) > 2 and now - samples[0][0] > self.window_s:
            samples.popleft()
        first_t, first_n = samples[0]
        if len(samples) < 2 or now <= first_t:
            return None
        return (count - first_n) / (now - first_t)


def _tone(status: str) -> str:
    if status in ("HEALTHY", "RUNNING"):
        return "green"
    if status in ("UNHEALTHY", "DEPLOY_FAILED"):
        return "red"
    return "yellow"


def _ms(v: Any) -> str:
    if v is None:
        return "-"
    if v == float("inf") or v == "+Inf":
        return ">30s"
    return f"≤{v:g}ms"


def _qps(v: float | None) -> str:
    return "-" if v is None else (f"{v:.0f}" if v >= 100 else f"{v:.1f}")


def _replicas(dep: dict[str, Any]) -> str:
    states = dep.get("replica_states") or {}
    running = states.get("RUNNING", 0)
    others = ", ".join(f"{n} {s}" for s, n in sorted(states.items()) if s != "RUNNING")
    text = f"{running}/{dep.get('target_replicas', 0)}"
    return f"{text} ({others})" if others else text


# Below this many columns the table keeps the columns that matter most (deployment, status,
# replicas, req/s, p99, errors): the full set needs about 110.
NARROW_BELOW = 110
MESSAGE_CHARS = 200


def view(data: dict[str, Any], rates: Rates, now: float, *, address: str = "", error: str = "",
         interval: float = 1.0, width: int | None = None) -> RenderableType:
    """One frame: a header, then a table per application (``data`` is ``ServeStatus.to_dict()``);
    ``width`` (the terminal's columns) picks the compact table below :data:`NARROW_BELOW`.
    Status messages go under the table, one line per deployment, never squeezed into a column."""
    narrow = width is not None and width < NARROW_BELOW
    parts: list[RenderableType] = []
    head = Text()
    head.append("shoal", style="bold")
    if address:
        head.append(f"  {address}")
    if data.get("http_address"):
        head.append(f"  http {data['http_address']}")
    parts.append(head)
    parts.append(Text(f"updated {time.strftime('%H:%M:%S')} (every {interval:g}s, Ctrl-C to exit)", style="dim"))
    if data.get("resources"):
        parts.append(Text(str(data["resources"]), style="dim"))
    if error:
        parts.append(Text(f"cannot reach the instance: {error}", style="bold red"))
    apps: dict[str, Any] = data.get("applications") or {}
    if not apps and not error:
        parts.append(Text("no applications deployed"))
    columns: tuple[tuple[str, str], ...] = (("deployment", "left"), ("status", "left"), ("replicas", "right"),
               ("req/s", "right"),
               ("p50", "right"), ("p99", "right"), ("requests", "right"), ("errors", "right"),
               ("error rate", "right"))
    if narrow:
        columns = tuple(c for c in columns if c[0] not in ("p50", "requests", "error rate"))
    for name, app in apps.items():
        metrics = app.get("metrics") or {}
        table = Table(expand=False, title_justify="left", show_edge=False, pad_edge=False, box=box.SIMPLE_HEAD,
                      collapse_padding=True)
        route = app.get("route_prefix")
        title = Text()
        title.append(name, style="bold")
        title.append(f"  {app.get('status', '')}", style=_tone(str(app.get("status", ""))))
        title.append(f"  route {route}" if route is not None else "  no HTTP route")
        title.append(f"  version {app.get('version', '')}", style="dim")
        table.title = title
        for col, justify in columns:
            table.add_column(col, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                             overflow="ellipsis", max_width=22 if col == "deployment" else None)
        messages: list[Text] = []
        for dname, dep in (app.get("deployments") or {}).items():
            m = dep.get("metrics") or {}
            rate = rates.update(f"{name}/{dname}@{dep.get('version', '')}", now, m.get("requests"))
            cells = {"deployment": dname,
                     "status": Text(str(dep.get("status", "")), style=_tone(str(dep.get("status", "")))),
                     "replicas": _replicas(dep), "req/s": _qps(rate), "p50": _ms(m.get("p50_ms")),
                     "p99": _ms(m.get("p99_ms")), "requests": str(m.get("requests", 0)),
                     "errors": str(m.get("errors", 0)), "error rate": f"{m.get('error_rate', 0.0):.2%}"}
            table.add_row(*(cells[c] for c, _ in columns))
            message = (dep.get("message") or "").split("\n", 1)[0]
            if message:
                cut = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 1] + "…"
                line = Text(f"  {dname}: ", style="bold")
                line.append(cut, style=_tone(str(dep.get("status", ""))))
                messages.append(line)
        parts.append(table)
        parts.extend(messages)
        canary = app.get("canary")
        if canary:
            cm = canary.get("metrics") or {}
            crate = rates.update(f"{name}#canary@{canary.get('version', '')}", now, cm.get("requests"))
            line = Text("  canary ", style="bold magenta")
            line.append(f"{canary.get('weight', 0):g}% of traffic, version {canary.get('version', '')} ")
            line.append(str(canary.get("status", "")), style=_tone(str(canary.get("status", ""))))
            line.append(f"  {_qps(crate)} req/s  p50 {_ms(cm.get('p50_ms'))}  p99 {_ms(cm.get('p99_ms'))}  "
                        f"{cm.get('requests', 0)} requests, {cm.get('errors', 0)} errors")
            deps = canary.get("deployments") or {}
            if deps:
                line.append("  " + ", ".join(f"{d} {v.get('status', '')}" for d, v in deps.items()), style="dim")
            parts.append(line)
            parts.append(Text(f"  finish with `shoal promote {name}` or `shoal rollback {name}`", style="dim"))
        if metrics.get("requests"):
            parts.append(Text(f"  {name}: {metrics['requests']} requests through its ingress, p50 "
                              f"{_ms(metrics.get('p50_ms'))}, p99 {_ms(metrics.get('p99_ms'))}, "
                              f"error rate {metrics.get('error_rate', 0.0):.2%}", style="dim"))
        parts.append(Text(""))
    return Group(*parts)


def run(fetch: Callable[[], dict[str, Any]], *, interval: float = 1.0, iterations: int | None = None,
        console: Console | None = None, address: str = "", clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep) -> None:
    """Refresh the view every ``interval`` seconds, ``iterations`` times (None: until Ctrl-C,
    which the caller catches). A failed fetch shows its error and the last status."""
    rates = Rates()
    data: dict[str, Any] = {}
    done = 0
    with Live(console=console or Console(), auto_refresh=False, transient=False) as live:
        while True:
            error = ""
            try:
                data = fetch()
            except Exception as e:
                error = str(e) or type(e).__name__
            frame = view(data, rates, clock(), address=address, error=error, interval=interval,
                         width=live.console.width)
            live.update(frame, refresh=True)
            done += 1
            if iterations is not None and done >= iterations:
                return
            sleep(interval)
