"""Large payloads through handles: 1 / 10 / 100 MB numpy arrays and torch tensors, shared memory on vs off.

    python benchmarks/payload_shm.py [--framework shoal|ray] [--sizes 1,10,100] [--calls 20]
                                     [--json benchmarks/payload_shm.json] [--write-results] [--report-only]
                                     [--median-of RUN.json ...]

The driver process starts an instance, deploys ``benchmarks/apps/payload_shm.py`` (``Echo``, and
the 3-deployment pipeline ``Ingress -> A -> B`` whose steps return what they are given) and,
through the handles ``serve.run`` returned, calls each with a float64 numpy array and a float32
torch tensor of each size (MB = 2**20 bytes), back to back, one at a time:

- *one call*: ``echo.run.remote(x).result()``: the payload goes to the replica and comes back;
- *3-step pipeline*: ``ingress.run.remote(x).result()``: driver -> Ingress -> A -> Ingress -> B
  -> Ingress -> driver, six transfers of the payload.

It reports each call's p50 (one warm-up call, then ``--calls`` calls; fewer at 100 MB) and MB/s
= payload MB / p50 seconds. The first answer of each cell is compared with what was sent.

``--framework shoal`` measures two instances one after the other: ``SHOAL_SHM_THRESHOLD_BYTES``
unset (shared memory from 1 MiB on, the default) and ``=0`` (everything through the Unix
socket). ``--framework ray`` runs the same app under Ray Serve (run it with ``.venv-bench``, where
Ray is installed). Each run's numbers go into ``--json`` under its column, keeping the other
columns; ``--write-results`` renders every column there into ``benchmarks/RESULTS.md`` between
the markers of its "Large payloads" section (``report.py`` keeps that section when it rewrites
the file). ``--median-of`` measures nothing: it takes the files of several runs (shoal's and
Ray's, alternated, on a shared machine) and writes into ``--json`` each cell's median p50 over them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

START_MARK = "<!-- payload-shm:start -->"
END_MARK = "<!-- payload-shm:end -->"
MB = 1 << 20
COLUMNS = {"shoal-shm": "shoal, shared memory (default)", "shoal-socket": "shoal, socket (threshold 0)",
           "ray": "Ray Serve"}
PATHS = {"call": "one call", "pipeline": "3-step pipeline"}
TARGET = 3.0  # issue 22: shoal >= 3x Ray's MB/s at 10 and 100 MB


def calls_for(size_mb: int, calls: int) -> int:
    return max(5, min(calls, round(calls * 10 / size_mb))) if size_mb > 10 else calls


def payloads(size_mb: int) -> dict[str, Any]:
    """A float64 numpy array and a float32 torch tensor of ``size_mb`` MB (no tensor where torch
    is not installed, as in ``.venv-bench``)."""
    import numpy as np

    rng = np.random.default_rng(size_mb)
    out: dict[str, Any] = {"numpy": rng.random(size_mb * MB // 8)}
    try:
        import torch
    except ImportError:
        return out
    out["torch"] = torch.from_numpy(rng.random(size_mb * MB // 4, dtype=np.float32))
    return out


def same(a: Any, b: Any) -> bool:
    import numpy as np

    if type(a).__module__.startswith("torch"):
        import torch

        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(np.array_equal(a, b))


def measure(handles: dict[str, Any], sizes: list[int], calls: int) -> dict[str, Any]:
    """Every (path, kind, size) cell: p50 and mean milliseconds, MB/s at the p50."""
    out: dict[str, Any] = {}
    for size in sizes:
        data = payloads(size)
        for path, handle in handles.items():
            for kind, value in data.items():
                got = handle.run.remote(value).result(timeout_s=600)  # warm-up, and the check
                if not same(value, got):
                    raise RuntimeError(f"{path}/{kind}/{size} MB: the answer differs from what was sent")
                del got
                lat = []
                for _ in range(calls_for(size, calls)):
                    t0 = time.perf_counter()
                    handle.run.remote(value).result(timeout_s=600)
                    lat.append(time.perf_counter() - t0)
                p50 = statistics.median(lat)
                cell = {"calls": len(lat), "p50_ms": p50 * 1e3, "mean_ms": statistics.fmean(lat) * 1e3,
                        "mb_per_s": size / p50}
                out.setdefault(path, {}).setdefault(kind, {})[str(size)] = cell
                print(f"  {path:8} {kind:5} {size:4} MB: p50 {cell['p50_ms']:9.2f} ms  {cell['mb_per_s']:8.1f} MB/s "
                      f"({len(lat)} calls)", flush=True)
    return out


def page_costs(size_mb: int) -> dict[str, float]:
    """Milliseconds this machine takes for the memory steps of one transfer of ``size_mb`` MB,
    measured on a scratch file in /dev/shm: what shared memory pays per message (new pages,
    faults on a new mapping, freeing) against memory that is already there."""
    import mmap

    import numpy as np

    data = np.random.default_rng(0).random(size_mb * MB // 8)
    raw = memoryview(data).cast("B")
    path = f"/dev/shm/shoal-bench-pages-{os.getpid()}-{time.monotonic_ns()}"
    out: dict[str, float] = {}

    def timed(key: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        got = fn()
        out[key] = (time.perf_counter() - t0) * 1e3
        return got

    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        timed("write_new_pages", lambda: os.pwrite(fd, raw, 0))
        timed("write_existing_pages", lambda: os.pwrite(fd, raw, 0))
        mapping = mmap.mmap(fd, len(raw), access=mmap.ACCESS_COPY)
        view = np.frombuffer(mapping, dtype=np.float64)
        timed("read_new_mapping", view.sum)
        timed("read_mapped_again", view.sum)
        del view
        mapping.close()
    finally:
        os.close(fd)
    timed("free_pages", lambda: os.unlink(path))
    copy = timed("copy_into_new_memory", data.copy)
    timed("copy_into_existing_memory", lambda: np.copyto(copy, data))
    return out


def shmem_huge_pages() -> str:
    """The kernel's transparent huge page setting for shared memory (tmpfs, /dev/shm): the
    bracketed word of /sys/kernel/mm/transparent_hugepage/shmem_enabled, or "unknown"."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_shoal(sizes: list[int], calls: int) -> dict[str, Any]:
    from shoal.runtime.shm import THRESHOLD_ENV

    results = {}
    for column, threshold in (("shoal-shm", None), ("shoal-socket", "0")):
        if threshold is None:
            os.environ.pop(THRESHOLD_ENV, None)
        else:
            os.environ[THRESHOLD_ENV] = threshold
        os.environ["SHOAL_RUN_DIR"] = tempfile.mkdtemp(prefix="shoal-bshm-", dir="/tmp")
        from benchmarks.apps import payload_shm as apps

        apps.serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        try:
            handles = {"call": apps.serve.run(apps.echo_app, name="echo", route_prefix="/echo"),
                       "pipeline": apps.serve.run(apps.pipeline_app, name="pipe", route_prefix="/pipe")}
            print(f"{COLUMNS[column]}:", flush=True)
            results[column] = measure(handles, sizes, calls)
        finally:
            apps.serve.shutdown()
    os.environ.pop(THRESHOLD_ENV, None)
    return results


def run_ray(sizes: list[int], calls: int) -> dict[str, Any]:
    os.environ["BENCH_FRAMEWORK"] = "ray"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    # Each Ray replica reserves one logical CPU: four replicas need four on a 2-core machine.
    ray.init(num_cpus=max(4, os.cpu_count() or 1))
    from benchmarks.apps import payload_shm as apps

    try:
        apps.serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handles = {"call": apps.serve.run(apps.echo_app, name="echo", route_prefix="/echo"),
                   "pipeline": apps.serve.run(apps.pipeline_app, name="pipe", route_prefix="/pipe")}
        print(f"{COLUMNS['ray']} {ray.__version__}:", flush=True)
        return {"ray": measure(handles, sizes, calls)}
    finally:
        apps.serve.shutdown()
        ray.shutdown()


def _cell(result: dict[str, Any], column: str, path: str, kind: str, size: str) -> dict[str, Any] | None:
    got: dict[str, Any] | None = result.get("columns", {}).get(column, {}).get(path, {}).get(kind, {}).get(size)
    return got


def markdown(result: dict[str, Any]) -> str:
    columns = [c for c in COLUMNS if c in result.get("columns", {})]
    sizes = sorted({s for c in columns for p in result["columns"][c].values() for k in p.values() for s in k},
                   key=int)
    lines = [START_MARK, "## Large payloads through handles (shared memory on vs off)", ""]
    for column in columns:
        run = result["runs"][column]
        lines.append(f"- {COLUMNS[column]}: `{run['command']}`"
                     + (f", median of {run['runs']} runs" if run.get("runs") else "")
                     + f", {run['date']}, {run['cpus']} CPUs, load average "
                     f"{run['load_average_1m'][0]}{' to ' if run.get('runs') else ' -> '}{run['load_average_1m'][1]}"
                     + (f", {run['version']}" if run.get("version") else ""))
    lines += ["", "Each cell: p50 of back-to-back calls, and MB/s = payload MB / p50 s (MB = 2^20 bytes). *One call*: "
              "the payload goes to a replica and comes back; *3-step pipeline*: driver -> Ingress -> A -> Ingress -> "
              "B -> Ingress -> driver (six transfers). See [payload_shm.py](payload_shm.py).", ""]
    head = "| payload | path | " + " | ".join(COLUMNS[c] for c in columns)
    ratios = [("shm / socket", "shoal-shm", "shoal-socket"), ("shm / Ray", "shoal-shm", "ray")]
    ratios = [r for r in ratios if r[1] in columns and r[2] in columns]
    lines += [head + "".join(f" | {r[0]} MB/s" for r in ratios) + " |",
              "|---|---|" + "---|" * (len(columns) + len(ratios))]
    met: list[bool] = []
    for kind in ("numpy", "torch"):
        for path in PATHS:
            for size in sizes:
                cells = [_cell(result, c, path, kind, size) for c in columns]
                row = f"| {size} MB {kind} | {PATHS[path]} | " + " | ".join(
                    f"{c['p50_ms']:,.1f} ms, {c['mb_per_s']:,.0f} MB/s" if c else "—" for c in cells)
                for _, a, b in ratios:
                    ca, cb = _cell(result, a, path, kind, size), _cell(result, b, path, kind, size)
                    q = ca["mb_per_s"] / cb["mb_per_s"] if ca and cb else None
                    row += f" | {q:.1f}x" if q else " | —"
                    if b == "ray" and q is not None and int(size) >= 10:
                        met.append(q >= TARGET)
                lines.append(row + " |")
    if met:
        lines += ["", f"Target (issue 22): ≥ {TARGET:g}x Ray's MB/s at 10 and 100 MB: met in {sum(met)} of "
                  f"{len(met)} cells."]
    else:
        lines += ["", f"Target (issue 22): ≥ {TARGET:g}x Ray's MB/s at 10 and 100 MB: Ray was not measured in "
                  "this file's runs (`.venv-bench/bin/python benchmarks/payload_shm.py --framework ray`)."]
    costs = result.get("page_costs")
    if costs:
        lines += ["", f"Where the time of one {costs['size_mb']} MB transfer through shared memory goes on this "
                  "machine (measured by the same script on a scratch file in /dev/shm, ms): writing into new pages "
                  f"{costs['write_new_pages']:.1f} (into pages that already exist: "
                  f"{costs['write_existing_pages']:.1f}); "
                  f"reading through a new mapping {costs['read_new_mapping']:.1f} (the same mapping again: "
                  f"{costs['read_mapped_again']:.1f}); freeing the pages {costs['free_pages']:.1f}. Plain copies: into "
                  f"new memory {costs['copy_into_new_memory']:.1f}, into memory already used "
                  f"{costs['copy_into_existing_memory']:.1f}. A fresh segment is new memory in 4 KiB pages (huge "
                  f"pages for shared memory: `{costs.get('shmem_huge', 'unknown')}`), mapped once and freed once; "
                  "so each connection's sender reuses a pool of segments that both sides mapped once (as Ray's "
                  "object store is one region each process maps once), and a steady-state transfer costs about "
                  "writing into pages that already exist, the copy alone."]
    lines.append(END_MARK)
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the section between the markers in ``path``, or append it."""
    text = path.read_text() if path.is_file() else ""
    if START_MARK in text and END_MARK in text:
        head, rest = text.split(START_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def median_of(paths: list[str]) -> dict[str, Any]:
    """One result whose every cell is the median, over the runs in ``paths``, of that cell's p50."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out: dict[str, Any] = {"columns": {}, "runs": {}}
    for column in COLUMNS:
        having = [r for r in runs if column in r.get("columns", {})]
        if not having:
            continue
        cells: dict[str, Any] = {}
        for path, kinds in having[0]["columns"][column].items():
            for kind, sizes in kinds.items():
                for size, first in sizes.items():
                    got = [c for r in having if (c := _cell(r, column, path, kind, size)) is not None]
                    p50 = statistics.median(c["p50_ms"] for c in got)
                    cells.setdefault(path, {}).setdefault(kind, {})[size] = {
                        "calls": first["calls"], "p50_ms": p50, "mean_ms": statistics.median(c["mean_ms"] for c in got),
                        "mb_per_s": int(size) / (p50 / 1000), "runs": len(got),
                        "p50_ms_each_run": [round(c["p50_ms"], 2) for c in got]}
        meta = [r["runs"][column] for r in having]
        loads = [x for m in meta for x in m["load_average_1m"]]
        out["columns"][column] = cells
        command = meta[0]["command"].split(" --json")[0]  # where each run kept its numbers: not this file
        out["runs"][column] = {
            "command": command, "runs": len(having), "date": f"{meta[0]['date']} .. {meta[-1]['date']}",
            "cpus": meta[0]["cpus"], "load_average_1m": [min(loads), max(loads)], "version": meta[0].get("version", "")}
    costs = [r["page_costs"] for r in runs if "page_costs" in r]
    if costs:
        out["page_costs"] = {k: (statistics.median(c[k] for c in costs) if isinstance(v, float) else v)
                             for k, v in costs[0].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--framework", choices=["shoal", "ray"], default="shoal")
    parser.add_argument("--sizes", default="1,10,100", help="comma-separated MB (default 1,10,100)")
    parser.add_argument("--calls", type=int, default=20, help="calls per cell up to 10 MB (fewer above)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "payload_shm.json"),
                        help="where the numbers are kept, one entry per column")
    parser.add_argument("--write-results", action="store_true", help="update the section in benchmarks/RESULTS.md")
    parser.add_argument("--report-only", action="store_true", help="measure nothing: render --json's numbers")
    parser.add_argument("--median-of", nargs="+", metavar="RUN_JSON",
                        help="measure nothing: write into --json the median of these runs' cells")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if not sizes or sizes[0] < 1 or args.calls < 1:
        parser.error("--sizes and --calls must be positive")
    if args.median_of:
        merged = median_of(args.median_of)
        Path(args.json).write_text(json.dumps(merged, indent=2) + "\n")
        args.report_only = True
    if args.report_only:
        section = markdown(json.loads(Path(args.json).read_text()))
        print(section)
        if args.write_results:
            write_section(REPO / "benchmarks" / "RESULTS.md", section)
        return 0
    load_before = os.getloadavg()[0]
    fresh = run_shoal(sizes, args.calls) if args.framework == "shoal" else run_ray(sizes, args.calls)
    if args.framework == "shoal":
        fresh_costs = {"size_mb": sizes[-1], "shmem_huge": shmem_huge_pages(), **page_costs(sizes[-1])}
    command = "python benchmarks/payload_shm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    version = ""
    if args.framework == "ray":
        import ray

        version = f"Ray {ray.__version__}"
    run = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cpus": os.cpu_count(), "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "version": version}
    store = Path(args.json)
    result: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    for column, cells in fresh.items():
        result.setdefault("columns", {})[column] = cells
        result.setdefault("runs", {})[column] = run
    if args.framework == "shoal":
        result["page_costs"] = fresh_costs
    store.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if args.write_results:
        write_section(REPO / "benchmarks" / "RESULTS.md", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
