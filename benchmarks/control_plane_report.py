"""The control-plane benchmark's report (``control_plane.py``): a RESULTS.md section and a chart."""

from __future__ import annotations

import datetime
import math
import os
import platform
from typing import Any

START_MARK = "<!-- control-plane:start -->"
END_MARK = "<!-- control-plane:end -->"
TICK_TARGET_MS = 50.0
TARGET_REPLICAS = 2000


def machine(load_before: str, load_after: str) -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": load_before, "load_after": load_after}


def point_line(p: dict[str, Any]) -> str:
    return (f"{p['replicas']:>5} replicas: tick p50 {p['steady']['tick_ms']['p50']:.1f} ms "
            f"max {p['steady']['tick_ms']['max']:.1f} ms; status {p['status']['ms']['p50']:.1f} ms; "
            f"RSS +{p['rss_growth_mb']:.0f} MB")


def series(points: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each curve of the report, one value per point (in the order of ``points``)."""
    def heap(p: dict[str, Any]) -> float:
        return float(p["heap_mb"]["after_all"]) if p.get("heap_mb") else float("nan")

    return {
        "replicas": [p["replicas"] for p in points],
        "tick_p50_ms": [p["steady"]["tick_ms"]["p50"] for p in points],
        "tick_max_ms": [p["steady"]["tick_ms"]["max"] for p in points],
        "churn_tick_p50_ms": [p["churn"]["tick_ms"]["p50"] for p in points],
        "status_p50_ms": [p["status"]["ms"]["p50"] for p in points],
        "status_kb": [p["status"]["bytes"] / 1024 for p in points],
        "bringup_router_mb": [p["bringup"]["bytes"].get("router", 0) / 2**20 for p in points],
        "change_router_kb": [p["churn"]["bytes_per_change"]["router"] / 1024 for p in points],
        "change_proxy_kb": [p["churn"]["bytes_per_change"]["proxy"] / 1024 for p in points],
        "rss_growth_mb": [p["rss_growth_mb"] for p in points],
        "heap_mb": [heap(p) for p in points],
    }


def slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of log(y) over log(x): 1 is linear growth, above 1 faster."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0 and y == y]
    if len(pairs) < 2:
        return None
    mx = sum(a for a, _ in pairs) / len(pairs)
    my = sum(b for _, b in pairs) / len(pairs)
    den = sum((a - mx) ** 2 for a, _ in pairs)
    return sum((a - mx) * (b - my) for a, b in pairs) / den if den else None


def markdown(data: dict[str, Any]) -> str:
    points = sorted(data["points"], key=lambda p: p["replicas"])
    m = data["machine"]
    s = series(points)
    first = points[0]
    lines = [
        START_MARK,
        "## Control plane at scale (fake replicas)",
        "",
        f"Produced by `{data['command']}` ([control_plane.py](control_plane.py) says what is real and what is "
        f"fake); {m['date']}, {m['cores']} CPUs ({m['cpu']}), Python {m['python']}, load average "
        f"{m['load_before']} -> {m['load_after']} (**other sessions share these cores: the times are noisy**), "
        f"{data['wall_s'] / 60:.1f} min. A real controller, in-process; replicas from a fake process factory "
        f"come up at once; {first['callers']} routers subscribed to every deployment, one proxy to the route "
        f"table; {points[0]['steady']['ticks']} steady ticks of {data['tick_s'] * 1000:.0f} ms of a fake clock "
        f"({points[0]['steady']['ticks'] * data['tick_s']:g} s: the default 10 s health checks run "
        f"{'once' if points[0]['steady']['ticks'] * data['tick_s'] >= 10 else 'not at all'} in them), then "
        f"{points[0]['churn']['changes']} changes (a replica crashes and is replaced).",
        "",
        "| replicas | apps x deployments | tick p50 / p90 / max | churn tick p50 / max | status call p50 "
        "(reply size) | push at bring-up (routers) | push per change: routers / proxy | RSS growth | "
        "controller heap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        t, c = p["steady"]["tick_ms"], p["churn"]["tick_ms"]
        heap = f"{p['heap_mb']['after_all']:.1f} MB" if p.get("heap_mb") else "—"
        per = p["churn"]["bytes_per_change"]
        msgs = p["churn"]["messages_per_change"]
        lines.append(
            f"| {p['replicas']:,} | {p['apps']} x {p['deployments'] // p['apps']} | "
            f"{t['p50']:.1f} / {t['p90']:.1f} / {t['max']:.1f} ms | {c['p50']:.1f} / {c['max']:.1f} ms | "
            f"{p['status']['ms']['p50']:.1f} ms ({p['status']['bytes'] / 1024:,.0f} KB) | "
            f"{p['bringup']['bytes'].get('router', 0) / 2**20:.1f} MB in {p['bringup']['messages'].get('router', 0):,} "
            f"messages | {per['router'] / 1024:.1f} KB ({msgs['router']:.0f} msgs) / {per['proxy'] / 1024:.1f} KB | "
            f"{p['rss_growth_mb']:.0f} MB | {heap} |")
    if any(len(p.get("rounds_tick_p50_ms", [])) > 1 for p in points):
        lines += ["", "Each row is the round (of " + str(len(first.get("rounds_tick_p50_ms", []))) + ") whose steady "
                  "tick p50 is the median; the rounds' tick p50s: " + "; ".join(
                      f"{p['replicas']:,}: " + ", ".join(f"{x:.1f}" for x in p["rounds_tick_p50_ms"])
                      for p in points) + " ms."]
    lines += ["", "Growth against replicas (slope of log(value) over log(replicas): 1 = linear):", ""]
    names = {"tick_p50_ms": "tick p50", "tick_max_ms": "tick max", "status_p50_ms": "status call",
             "status_kb": "status reply size", "bringup_router_mb": "push at bring-up",
             "change_proxy_kb": "route-table push per change", "rss_growth_mb": "RSS growth",
             "heap_mb": "controller heap"}
    parts = []
    for key, label in names.items():
        k = slope(s["replicas"], s[key])
        if k is not None:
            parts.append(f"{label} {k:.2f}")
    lines.append("; ".join(parts) + ".")
    at = next((p for p in points if p["replicas"] == TARGET_REPLICAS), None)
    if at is not None:
        t = at["steady"]["tick_ms"]
        lines += ["", f"Target (issue 22): tick ≤ {TICK_TARGET_MS:.0f} ms at {TARGET_REPLICAS:,} replicas: p50 "
                  f"{t['p50']:.1f} ms, p90 {t['p90']:.1f} ms, max {t['max']:.1f} ms: "
                  + ("**met** (p50 and p90)" if t["p90"] <= TICK_TARGET_MS else "**not met**")
                  + "; growth at most linear: " + _linear_verdict(s) + "."]
    lines += ["", "Push per change: what one change (a replica gone, then its replacement running) sends to the "
              "deployment's routers (each gets its membership: its replicas only, so this does not grow with the "
              "instance) and to the proxy (the route table of every app, sent when an ingress deployment "
              "changes: it grows with the apps). Status: the `status` admin call as the controller serves it "
              "(`serve.status()`, `shoal status`), handler and reply pickle. Heap: tracemalloc of everything "
              "allocated after the start, less the benchmark's own fakes.", "",
              "![control plane at scale](control_plane.png)", END_MARK]
    return "\n".join(lines)


def _linear_verdict(s: dict[str, list[float]]) -> str:
    k = slope(s["replicas"], s["tick_p50_ms"])
    h = slope(s["replicas"], s["heap_mb"])
    worst = max(x for x in (k, h) if x is not None) if (k is not None or h is not None) else None
    if worst is None:
        return "not measured"
    return f"{'yes' if worst <= 1.15 else '**no**'} (largest slope {worst:.2f})"


def write_section(path: str, section: str) -> None:
    """Replace the section between the markers in ``path``, or append it."""
    text = ""
    if os.path.isfile(path):
        with open(path) as f:
            text = f.read()
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        text = head + section + rest.split(END_MARK, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def write_chart(path: str, data: dict[str, Any]) -> bool:
    """Four panels against replicas, each with a dashed line of linear growth from the first point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", flush=True)
        return False
    points = sorted(data["points"], key=lambda p: p["replicas"])
    s = series(points)
    xs = s["replicas"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0][0], "controller tick (ms)", [("tick_p50_ms", "steady p50"), ("tick_max_ms", "steady max"),
                                              ("churn_tick_p50_ms", "churn p50")], TICK_TARGET_MS),
        (axes[0][1], "status call (ms) and reply (KB)", [("status_p50_ms", "status p50 ms"),
                                                         ("status_kb", "reply KB")], None),
        (axes[1][0], "pushes", [("bringup_router_mb", "routers at bring-up (MB)"),
                                ("change_router_kb", "routers per change (KB)"),
                                ("change_proxy_kb", "proxy per change (KB)")], None),
        (axes[1][1], "memory (MB)", [("rss_growth_mb", "RSS growth"), ("heap_mb", "controller heap")], None),
    ]
    for ax, title, curves, target in panels:
        for key, label in curves:
            ys = s[key]
            line = ax.plot(xs, ys, marker="o", label=label)[0]
            if ys and ys[0] == ys[0] and ys[0] > 0:
                ax.plot(xs, [ys[0] * x / xs[0] for x in xs], linestyle=":", color=line.get_color(), alpha=0.6)
        if target is not None:
            ax.axhline(target, color="black", linewidth=1, linestyle="--", label=f"target {target:.0f} ms")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("replicas")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("shoal control plane against replicas (dotted: linear growth from the smallest point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
