"""The report: the table of shoal vs Ray Serve vs bare uvicorn (RESULTS.md), the machine, the chart."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from benchmarks import baseline as bl
from benchmarks.common import FRAMEWORKS, ROOT, log

# The Ray Serve 2.60 numbers quoted in issue 4 (measured there on a machine like this one).
ISSUE_REF = {
    "echo_c1": "402 req/s, p50 2.35 ms", "echo_c8": "525 req/s, p50 14.7 ms", "echo_c32": "45 req/s, p50 791 ms",
    "pipe_c1": "92 req/s, p50 10.7 ms", "pipe_c8": "105 req/s", "pipe_c32": "11 req/s",
    "handle_c1": "p50 1.9 ms (493 calls/s)", "handle_c64": "19 calls/s", "coldstart": "6.1 s",
    "memory": "741 MB in 11 processes", "batch": "28 % of ideal",
}


@dataclass
class Row:
    key: str
    label: str
    cells: dict[str, str]  # framework -> text
    ratio: float | None  # shoal/Ray of the row's primary metric
    ratio_text: str
    target: str
    met: bool | None
    # For the chart: achieved and target as "higher is better" factors.
    achieved: float | None = None
    goal: float | None = None


def _get(results: dict[str, Any], wl: str, fw: str, *keys: str) -> Any:
    cur: Any = results.get(wl, {}).get(fw)
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _fmt_rps(r: dict[str, Any] | None, unit: str = "req/s") -> str:
    if not r:
        return "—"
    text = f"{r['rps']:,.0f} {unit}, p50 {r['p50_ms']:.2f} ms" if "p50_ms" in r else f"{r['rps']:,.0f} {unit}"
    if r.get("errors") or r.get("non_2xx"):
        text += f" ({r['errors']} socket errors, {r['non_2xx']} non-2xx)"
    return text


def _grpc_errors(v: dict[str, Any]) -> str:
    return f" ({v['errors']} failed calls, first: {v['first_error']})" if v.get("errors") else ""


def build_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    # HTTP echo.
    shoal_c8 = _get(results, "echo", "shoal", "c8", "rps")
    for c in (1, 8, 32, 100):
        k = f"c{c}"
        s, r, b = (_get(results, "echo", fw, k) for fw in FRAMEWORKS)
        q = ratio(s and s["rps"], r and r["rps"])
        row = Row(f"echo_{k}", f"HTTP echo, concurrency {c}", {"shoal": _fmt_rps(s), "ray": _fmt_rps(r),
                  "bare": _fmt_rps(b)}, q, f"{q:.1f}x req/s" if q else "—", "", None)
        if c == 8:
            of_bare = ratio(s and s["rps"], b and b["rps"])
            row.target = "≥10x Ray and ≥25 % of bare"
            parts = [x for x in (q, of_bare) if x is not None]
            row.met = (q is None or q >= 10) and (of_bare is None or of_bare >= 0.25) if parts else None
            if of_bare is not None:
                row.ratio_text += f"; {of_bare:.0%} of bare"
            row.achieved, row.goal = q, 10.0
        elif c in (32, 100):
            of_c8 = ratio(s and s["rps"], shoal_c8)
            row.target = "shoal ≥0.95x its c8"
            row.met = None if of_c8 is None else of_c8 >= 0.95
            if of_c8 is not None:
                row.ratio_text += f"; {of_c8:.2f}x shoal c8"
            row.achieved, row.goal = of_c8, 0.95
        rows.append(row)
    seq = {fw: _get(results, "echo", fw, "seq") for fw in FRAMEWORKS}
    q = ratio(seq["shoal"] and seq["shoal"]["p50_ms"], seq["ray"] and seq["ray"]["p50_ms"])
    rows.append(Row("seq", "500 sequential no-op HTTP requests (p50 / p99)",
                    {fw: f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f} ms" if v else "—" for fw, v in seq.items()},
                    q, f"p50 x{q:.3f}" if q else "—", "", None))
    # Pipeline.
    for c in (1, 8, 32):
        k = f"c{c}"
        s, r = _get(results, "pipeline3", "shoal", k), _get(results, "pipeline3", "ray", k)
        if c == 1:
            q = ratio(s and s.get("p50_ms"), r and r.get("p50_ms"))
            rows.append(Row(f"pipe_{k}", "3-deployment pipeline over HTTP, c1", {"shoal": _fmt_rps(s),
                            "ray": _fmt_rps(r), "bare": "—"}, q, f"p50 x{q:.3f}" if q else "—",
                            "p50 ≤ 1/10 of Ray's", None if q is None else q <= 0.1,
                            None if not q else 1 / q, 10.0))
        else:
            q = ratio(s and s["rps"], r and r["rps"])
            rows.append(Row(f"pipe_{k}", f"3-deployment pipeline over HTTP, c{c}", {"shoal": _fmt_rps(s),
                            "ray": _fmt_rps(r), "bare": "—"}, q, f"{q:.1f}x req/s" if q else "—", "", None))
    # Using every core (cores.py): echo with 1 and 2 replicas.
    co = {fw: results.get("cores", {}).get(fw) for fw in ("shoal", "ray")}
    if any(co.values()):
        def _cores_cell(v: dict[str, Any] | None) -> str:
            if not v:
                return "—"
            top = ", ".join(f"{k} {c:.2f}" for k, c in list(v["r2"]["cores"].items())[:4])
            return (f"{v['r1']['rps']:,.0f} -> {v['r2']['rps']:,.0f} req/s ({v['ratio']:.2f}x); "
                    f"cores at 2: {top}")
        q = co["shoal"]["ratio"] if co["shoal"] else None
        rows.append(Row("cores", f"echo, 1 -> 2 replicas, c{(co['shoal'] or co['ray'] or {}).get('conns', 16)} "
                        "(wrk on the same cores)", {**{fw: _cores_cell(v) for fw, v in co.items()}, "bare": "—"},
                        q, f"{q:.2f}x (shoal 2/1)" if q else "—", "2 replicas ≥ 1.8x one",
                        None if q is None else q >= 1.8, q, 1.8))
    # Handles.
    h = {fw: results.get("handle", {}).get(fw) for fw in ("shoal", "ray")}
    q = ratio(h["shoal"] and h["shoal"]["c1_p50_ms"], h["ray"] and h["ray"]["c1_p50_ms"])
    rows.append(Row("handle_c1", "handle calls from the driver, c1 (500 sequential)",
                    {**{fw: f"p50 {v['c1_p50_ms']:.3f} ms ({v['c1_calls_per_s']:,.0f} calls/s)" if v else "—"
                        for fw, v in h.items()}, "bare": "—"},
                    q, f"p50 x{q:.3f}" if q else "—", "p50 ≤ 1/10 of Ray's", None if q is None else q <= 0.1,
                    None if not q else 1 / q, 10.0))
    q = ratio(h["shoal"] and h["shoal"]["cN_calls_per_s"], h["ray"] and h["ray"]["cN_calls_per_s"])
    rows.append(Row("handle_c64", "handle calls from the driver, c64",
                    {**{fw: f"{v['cN_calls_per_s']:,.0f} calls/s" if v else "—" for fw, v in h.items()},
                     "bare": "—"}, q, f"{q:.1f}x calls/s" if q else "—", "≥20x Ray and ≥15,000 calls/s",
                    None if q is None else (q >= 20 and h["shoal"]["cN_calls_per_s"] >= 15000), q, 20.0))
    # Handles from inside an ingress replica (issue 22's goals are absolute: charted as value / goal).
    hi = {fw: (v or {}).get("ingress") for fw, v in h.items()}
    s_hi = hi["shoal"]
    q = ratio(s_hi and s_hi["c1_p50_ms"], hi["ray"] and hi["ray"]["c1_p50_ms"])
    rows.append(Row("handle_ingress_c1", "handle calls from an ingress replica, c1 (500 sequential)",
                    {**{fw: f"p50 {v['c1_p50_ms']:.3f} ms ({v['c1_calls_per_s']:,.0f} calls/s)" if v else "—"
                        for fw, v in hi.items()}, "bare": "—"},
                    q, f"p50 x{q:.3f}" if q else "—", "p50 ≤ 0.09 ms",
                    None if not s_hi else s_hi["c1_p50_ms"] <= 0.09,
                    None if not s_hi else 0.09 / s_hi["c1_p50_ms"], 1.0))
    q = ratio(s_hi and s_hi["cN_calls_per_s"], hi["ray"] and hi["ray"]["cN_calls_per_s"])
    rows.append(Row("handle_ingress_c64", "handle calls from an ingress replica, c64",
                    {**{fw: f"{v['cN_calls_per_s']:,.0f} calls/s" if v else "—" for fw, v in hi.items()},
                     "bare": "—"}, q, f"{q:.1f}x calls/s" if q else "—", "≥27,000 calls/s",
                    None if not s_hi else s_hi["cN_calls_per_s"] >= 27000,
                    None if not s_hi else s_hi["cN_calls_per_s"] / 27000, 1.0))
    # Payload.
    for c in (1, 8):
        k = f"c{c}"
        s, r, b = (_get(results, "payload", fw, k) for fw in FRAMEWORKS)
        cells = {"shoal": _fmt_rps(s), "ray": _fmt_rps(r), "bare": _fmt_rps(b)}
        if c == 1:
            q = ratio(s and s.get("p50_ms"), r and r.get("p50_ms"))
            rows.append(Row("payload_c1", "1 MB POST body, c1", cells, q, f"p50 x{q:.3f}" if q else "—",
                            "p50 better than Ray's", None if q is None else q < 1, None if not q else 1 / q, 1.0))
        else:
            q = ratio(s and s["rps"], r and r["rps"])
            rows.append(Row("payload_c8", "1 MB POST body, c8", cells, q, f"{q:.1f}x req/s" if q else "—", "", None))
    # Streaming.
    st = {fw: results.get("stream", {}).get(fw) for fw in FRAMEWORKS}
    q = ratio(st["shoal"] and st["shoal"]["tokens_per_s"], st["ray"] and st["ray"]["tokens_per_s"])
    any_st = next((v for v in st.values() if v), None)
    label = (f"token streams: {any_st['clients']} concurrent x {any_st['tokens_per_stream']} tokens, 10 ms gap "
             f"(ideal {any_st['ideal_tokens_per_s']:,.0f} tokens/s)") if any_st else "token streams"
    rows.append(Row("stream", label, {fw: f"{v['tokens_per_s']:,.0f} tokens/s, TTFT p50 {v['ttft_p50_ms']:.1f} ms"
                                      + ("" if v["complete"] else " (incomplete)") if v else "—"
                                      for fw, v in st.items()},
                    q, f"{q:.2f}x tokens/s" if q else "—", "tokens/s better than Ray's",
                    None if q is None else q > 1, q, 1.0))
    # gRPC echo (grpc_echo.py): unary and server streaming through each framework's gRPC ingress.
    for kind in ("unary", "stream"):
        for c in sorted({int(k[1:]) for fw in ("shoal", "ray")
                         for k in (_get(results, "grpc", fw, kind) or {})}):
            g = {fw: _get(results, "grpc", fw, kind, f"c{c}") for fw in ("shoal", "ray")}
            callers = f"{c} caller{'s' if c > 1 else ''}"
            if kind == "unary":
                metric, label = "calls_per_s", f"gRPC unary echo, {callers} (calls/s, p50 / p99)"
                cells = {fw: f"{v['calls_per_s']:,.0f} calls/s, {v['p50_ms']:.2f} / {v['p99_ms']:.2f} ms"
                         + _grpc_errors(v) if v else "—" for fw, v in g.items()}
            else:
                n = _get(results, "grpc", "shoal", "messages_per_stream") or _get(
                    results, "grpc", "ray", "messages_per_stream")
                metric = "messages_per_s"
                label = f"gRPC server streaming, {n} messages per call, {callers} (messages/s, first message p50)"
                cells = {fw: f"{v['messages_per_s']:,.0f} messages/s, {v['ttfm_p50_ms']:.2f} ms" + _grpc_errors(v)
                         if v else "—" for fw, v in g.items()}
            q = ratio(g["shoal"] and g["shoal"][metric], g["ray"] and g["ray"][metric])
            rows.append(Row(f"grpc_{kind}_c{c}", label, {**cells, "bare": "—"}, q,
                            f"{q:.1f}x {metric.split('_')[0]}/s" if q else "—", "", None))
    # Batching.
    bt = {fw: results.get("batch", {}).get(fw) for fw in ("shoal", "ray")}
    q = ratio(bt["shoal"] and bt["shoal"]["fraction_of_ideal"], bt["ray"] and bt["ray"]["fraction_of_ideal"])
    frac = bt["shoal"]["fraction_of_ideal"] if bt["shoal"] else None
    rows.append(Row("batch", "@serve.batch, 5 ms + 0.2 ms/item, 64 handle callers (% of ideal)",
                    {**{fw: f"{v['fraction_of_ideal']:.0%} ({v['items_per_s']:,.0f} items/s, mean batch "
                        f"{v['mean_batch']:.1f})" if v else "—" for fw, v in bt.items()}, "bare": "—"},
                    q, f"{q:.2f}x" if q else "—", "shoal ≥90 % of ideal", None if frac is None else frac >= 0.9,
                    frac, 0.9))
    bh = {fw: v.get("http") if v else None for fw, v in bt.items()}
    q = ratio(bh["shoal"] and bh["shoal"]["fraction_of_ideal"], bh["ray"] and bh["ray"]["fraction_of_ideal"])
    rows.append(Row("batch_http", "@serve.batch, same handler, 64 HTTP connections (% of ideal)",
                    {**{fw: f"{v['fraction_of_ideal']:.0%} ({v['rps']:,.0f} req/s, mean batch {v['mean_batch']:.1f})"
                        if v else "—" for fw, v in bh.items()}, "bare": "—"},
                    q, f"{q:.2f}x" if q else "—", "", None))
    # Cold start.
    cs = {fw: results.get("coldstart", {}).get(fw) for fw in ("shoal", "ray")}
    q = ratio(cs["shoal"] and cs["shoal"]["median_s"], cs["ray"] and cs["ray"]["median_s"])
    shoal_s = cs["shoal"]["median_s"] if cs["shoal"] else None
    rows.append(Row("coldstart", "new process to first HTTP 200 (median)",
                    {**{fw: f"{v['median_s']:.2f} s" if v else "—" for fw, v in cs.items()}, "bare": "—"},
                    q, f"x{q:.3f}" if q else "—", "≤ 1/10 of Ray's and ≤ 0.4 s",
                    None if q is None or shoal_s is None else q <= 0.1 and shoal_s <= 0.4,
                    None if not q else 1 / q, 10.0))
    cc = {fw: v.get("cli") if v else None for fw, v in cs.items()}
    q = ratio(cc["shoal"] and cc["shoal"]["median_s"], cc["ray"] and cc["ray"]["median_s"])
    rows.append(Row("coldstart_cli", "`shoal run` / `serve run` of a serve config file to first HTTP 200 (median)",
                    {**{fw: f"{v['median_s']:.2f} s" if v else "—" for fw, v in cc.items()}, "bare": "—"},
                    q, f"x{q:.3f}" if q else "—", "", None))
    # Idle memory.
    mem = {fw: results.get("memory", {}).get(fw) for fw in FRAMEWORKS}
    q = ratio(mem["shoal"] and mem["shoal"]["pss_mb"], mem["ray"] and mem["ray"]["pss_mb"])
    rows.append(Row("memory", "idle memory, 1-deployment app, 5 s after start-up (PSS, all processes)",
                    {fw: f"{v['pss_mb']:,.0f} MB in {v['processes']} processes" if v else "—"
                     for fw, v in mem.items()},
                    q, f"x{q:.3f}" if q else "—", "≤ 1/5 of Ray's", None if q is None else q <= 0.2,
                    None if not q else 1 / q, 5.0))
    settled = {fw: v.get("settled") if v else None for fw, v in mem.items()}
    q = ratio(settled["shoal"] and settled["shoal"]["pss_mb"], settled["ray"] and settled["ray"]["pss_mb"])
    after = next((v["after_s"] for v in settled.values() if v), 0)
    shoal_mb = settled["shoal"]["pss_mb"] if settled["shoal"] else None
    rows.append(Row("memory_settled", f"idle memory of the same app {after:.0f} s after start-up (PSS, all processes)",
                    {fw: f"{v['pss_mb']:,.0f} MB in {v['processes']} processes" if v else "—"
                     for fw, v in settled.items()},
                    q, f"x{q:.3f}" if q else "—", "≤ 100 MB", None if shoal_mb is None else shoal_mb <= 100))
    if any(v and "idle_cpu_cores" in v for v in mem.values()):
        rows.append(Row("idle_cpu", "idle CPU of the same app (% of one core, after startup)",
                        {fw: f"{v['idle_cpu_cores']:.1%}" if v and "idle_cpu_cores" in v else "—"
                         for fw, v in mem.items()}, None, "—", "", None))
    return [r for r in rows if any(v != "—" for v in r.cells.values())]


def machine_info() -> dict[str, str]:
    info: dict[str, str] = {}
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info["cores"] = str(os.cpu_count())
    with suppress(OSError), open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
        info["ram"] = f"{kib / 1024 / 1024:.1f} GiB"
    os_name = platform.system()
    with suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    info["os"] = f"{os_name}, kernel {platform.release()}"
    info["python"] = platform.python_version()

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "shoal"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    info["shoal"] = f"{version('shoal')} @ {commit or 'unknown'}{' + uncommitted changes in shoal/' if dirty else ''}"
    info["ray"] = version("ray")
    info["uvicorn"] = version("uvicorn")
    wrk_path = shutil.which("wrk")
    if wrk_path:
        out = subprocess.run([wrk_path, "-v"], capture_output=True, text=True)
        info["wrk"] = (out.stdout + out.stderr).split("Copyright")[0].strip() or "wrk"
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return info


def write_markdown(path: str, rows: list[Row], meta: dict[str, Any]) -> None:
    m = meta["machine"]
    cfg = meta["settings"]
    command = meta.get("command") or ("python benchmarks/run.py" + (" --quick" if cfg["quick"] else "")
                                      + (f" --baseline {meta['baseline']['ref']}" if meta.get("baseline") else ""))
    lines = [
        "# shoal vs Ray Serve: benchmark results",
        "",
        f"Produced by `{command}` "
        "(see [README.md](README.md) for what each workload does and how it is measured).",
        "",
        f"- Machine: {m.get('cpu', '?')}, {m['cores']} cores, {m.get('ram', '?')} RAM; {m['os']}",
        f"- Python {m['python']}; shoal {m['shoal']}; Ray {m['ray']}; uvicorn {m['uvicorn']}; "
        f"{m.get('wrk', 'wrk missing')}",
        *([f"- Baseline: {meta['baseline']['label']} (`{meta['baseline']['ref']}` = {meta['baseline']['commit']}), "
           "a git worktree run by the same launcher and apps; shoal imported from "
           + ", ".join(f"`{v}` ({k})" for k, v in (meta.get("shoal_imported_from") or {}).items())]
          if meta.get("baseline") else []),
        f"- Date: {m['date']}; suite wall time {meta['wall_s'] / 60:.1f} min; "
        f"wrk runs of {cfg['duration_s']:g} s after a {cfg['warmup_s']:g} s warm-up, one wrk thread",
    ]
    if meta.get("rounds"):
        lines.append(f"- {len(meta['rounds'])} rounds: each number of this run is the median of its rounds "
                     "(results.json keeps every round under `rounds`)")
    for run in meta.get("earlier_runs") or []:
        rm = run.get("machine", {})
        lines.append(f"- Merged with an earlier run: {rm.get('date', '?')}"
                     + (f" (`{run['command']}`)" if run.get("command") else "") + f", shoal {rm.get('shoal', '?')}, "
                     f"{run.get('wall_s', 0) / 60:.1f} min; the entries measured in the latest run are "
                     f"{', '.join(dict.fromkeys(meta['measured']))}")
    bg = meta.get("background_cpu") or []
    if bg:
        lines.append(f"- CPU busy with other processes just before each measurement: mean {statistics.fmean(bg):.0%}, "
                     f"max {max(bg):.0%}" + (" (**noisy run: the machine was not idle**)" if max(bg) > 0.15 else ""))
    lines += [
        "",
        "| workload | shoal | Ray Serve | bare uvicorn | shoal/Ray | target | met? | Ray in issue 4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "—" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.label} | {r.cells.get('shoal', '—')} | {r.cells.get('ray', '—')} | "
                     f"{r.cells.get('bare', '—')} | {r.ratio_text} | {r.target or '—'} | {met} | "
                     f"{ISSUE_REF.get(r.key, '—')} |")
    lines += ["", "Ratios are shoal's number divided by Ray Serve's from this same run: below 1 is better for "
              "latencies, times and memory, above 1 for throughput.", ""]
    if meta.get("baseline"):
        lines += bl.markdown(meta.get("baseline_comparison") or [], meta["baseline"]["label"],
                             meta["baseline"]["tolerance"])
    if meta.get("leftovers"):
        lines += ["Processes that outlived their launcher and had to be killed: "
                  + ", ".join(f"{k}: {v}" for k, v in meta["leftovers"].items()), ""]
    if meta.get("failures"):
        lines += ["Failures:", ""] + [f"- {k}: {v}" for k, v in meta["failures"].items()] + [""]
    # Sections other scripts keep in this file (llm_batching.py's two, payload_shm.py's, control_plane.py's)
    # survive the rewrite.
    with suppress(OSError), open(path) as f:
        old = f.read()
        for name in ("llm-batching", "llm-batching-gpu", "payload-shm", "control-plane"):
            start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
            if start in old and end in old:
                lines += ["", old[old.index(start):old.index(end)] + end, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_chart(path: str, rows: list[Row]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart")
        return False
    data = [r for r in rows if r.achieved is not None and r.goal is not None and r.achieved > 0]
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(13, 5.5))
    xs = range(len(data))
    colors = ["#2e8b57" if r.met else "#c0392b" for r in data]
    ax.bar(xs, [r.achieved for r in data], color=colors, width=0.6, label="shoal (green: target met)")
    ax.scatter(xs, [r.goal for r in data], marker="_", s=900, color="black", linewidths=2.5, zorder=3,
               label="target")
    for x, r in zip(xs, data, strict=True):
        ax.annotate(f"{r.achieved:.3g}", (x, r.achieved), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    short = {"echo_c8": "echo c8\nreq/s vs Ray", "echo_c32": "echo c32\nvs shoal c8",
             "echo_c100": "echo c100\nvs shoal c8", "pipe_c1": "pipeline3 c1\nRay/shoal p50",
             "handle_c1": "handle c1\nRay/shoal p50", "handle_c64": "handle c64\ncalls/s vs Ray",
             "handle_ingress_c1": "ingress handle c1\n0.09 ms / p50",
             "handle_ingress_c64": "ingress handle c64\ncalls/s / 27k",
             "payload_c1": "1 MB POST c1\nRay/shoal p50", "stream": "streaming\ntokens/s vs Ray",
             "batch": "batching\nfraction of ideal", "coldstart": "cold start\nRay / shoal",
             "memory": "idle memory\nRay / shoal"}
    ax.set_xticklabels([short.get(r.key, r.key) for r in data], fontsize=8)
    ax.set_ylabel("higher is better (log scale)")
    ax.set_title("shoal against its targets (ratios to Ray Serve measured in the same run)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
