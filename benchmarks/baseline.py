"""shoal at an earlier commit, measured next to the working tree in the same run (``run.py --baseline REF``).

A refactor is checked against the numbers before it. Numbers from different runs differ by more
than most regressions (other load, thermal state, page cache), so both versions are measured in
one run, workload by workload, alternating which goes first (A B, B A, ...), so that a noisy
minute hits both alike.

The earlier version is a detached ``git worktree`` of REF in a scratch directory. Its shoal is
run by the *current* launcher and the *current* apps (copied over the old ones), so that only
``shoal/`` differs between the two columns: the runner starts the launcher with that tree as its
working directory, ``PYTHONPATH`` and ``BENCH_ROOT``, and the launcher prints which ``shoal``
it imported, which the runner checks. The worktree is removed at the end of the run.

This module holds the pure parts (which numbers to compare, the ratios, the verdicts, the
markdown) and the worktree's lifecycle; ``run.py`` does the measuring.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

# The framework key of the earlier version in results.json, next to "shoal", "ray" and "bare".
BASELINE = "baseline"
# The line the launcher prints once the app module (and with it shoal) is imported.
SHOAL_FILE_MARK = "BENCH shoal imported from "


@dataclass(frozen=True)
class Baseline:
    """The earlier version: the ref asked for, the commit it named, and the worktree holding it."""

    ref: str
    commit: str
    root: str

    @property
    def label(self) -> str:
        return f"shoal@{self.commit[:7]}"

    def as_json(self) -> dict[str, str]:
        return {**asdict(self), "label": self.label}


def _git(repo: str, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


@contextmanager
def checkout(repo: str, ref: str) -> Iterator[Baseline]:
    """A detached worktree of ``ref`` with the working tree's benchmark apps; removed on exit.

    Only ``git worktree add`` / ``remove`` touch the repository: the working tree, its index
    and HEAD are left alone.
    """
    commit = _git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}")
    scratch = tempfile.mkdtemp(prefix="shoal-baseline-")
    root = os.path.join(scratch, "tree")
    _git(repo, "worktree", "add", "--detach", root, commit)
    try:
        # The same workload programs in both columns: only shoal/ may differ.
        apps = os.path.join(root, "benchmarks", "apps")
        shutil.rmtree(apps, ignore_errors=True)
        shutil.copytree(os.path.join(repo, "benchmarks", "apps"), apps,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(os.path.join(repo, "benchmarks", "__init__.py"), os.path.join(root, "benchmarks"))
        if not os.path.exists(os.path.join(root, "shoal", "__init__.py")):
            raise SystemExit(f"{ref} ({commit[:7]}) has no shoal/ package")
        yield Baseline(ref, commit, root)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", root], cwd=repo, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def interleave(frameworks: list[str], index: int) -> list[str]:
    """The frameworks of the ``index``-th workload: "shoal" and the baseline swap places every other one."""
    if index % 2 == 0 or "shoal" not in frameworks or BASELINE not in frameworks:
        return list(frameworks)
    out = list(frameworks)
    i, j = out.index("shoal"), out.index(BASELINE)
    out[i], out[j] = out[j], out[i]
    return out


def median_of_rounds(rounds: list[Any]) -> Any:
    """One result from several rounds of the same measurement, leaf by leaf.

    Numbers: the median across the rounds that have them; flags: true only if true in every
    round; anything else (lists, text): the first round's.
    """
    if all(isinstance(r, dict) for r in rounds):
        keys = list(dict.fromkeys(k for r in rounds for k in r))
        return {k: median_of_rounds([r[k] for r in rounds if k in r]) for k in keys}
    if all(isinstance(r, bool) for r in rounds):
        return all(rounds)
    if all(isinstance(r, int | float) and not isinstance(r, bool) for r in rounds):
        return statistics.median(rounds)
    return rounds[0]


def imported_from(log_text: str) -> str | None:
    """The path the launcher's log says ``shoal`` was imported from, if it says so."""
    for line in log_text.splitlines():
        if line.startswith(SHOAL_FILE_MARK):
            return line[len(SHOAL_FILE_MARK):].strip()
    return None


def check_tree(log_text: str, expected_root: str) -> str:
    """Raise unless the log shows ``shoal`` imported from ``expected_root``; returns the path."""
    path = imported_from(log_text)
    want = os.path.join(os.path.realpath(expected_root), "shoal") + os.sep
    if path is None:
        raise RuntimeError("the launcher did not say where it imported shoal from")
    if not os.path.realpath(path).startswith(want):
        raise RuntimeError(f"shoal was imported from {path}, not from {want}")
    return path


# ---------------------------------------------------------------------------------------------
# The comparison: one metric per line, new (working tree) over old (the baseline).


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    workload: str
    path: tuple[str, ...]  # keys into results[workload][framework]
    higher_is_better: bool
    unit: str
    # An absolute difference below this is "same" whatever the ratio (idle CPU: 0.2 % vs 0.4 % of a core).
    floor: float = 0.0


METRICS: tuple[Metric, ...] = (
    *(Metric(f"echo_c{c}_rps", f"HTTP echo c{c}", "echo", (f"c{c}", "rps"), True, "req/s") for c in (1, 8, 32, 100)),
    Metric("echo_c1_p50", "HTTP echo c1 p50", "echo", ("c1", "p50_ms"), False, "ms"),
    Metric("echo_c8_p99", "HTTP echo c8 p99", "echo", ("c8", "p99_ms"), False, "ms"),
    Metric("seq_p50", "500 sequential GETs p50", "echo", ("seq", "p50_ms"), False, "ms"),
    Metric("pipe_c1_p50", "pipeline3 c1 p50", "pipeline3", ("c1", "p50_ms"), False, "ms"),
    *(Metric(f"pipe_c{c}_rps", f"pipeline3 c{c}", "pipeline3", (f"c{c}", "rps"), True, "req/s") for c in (1, 8, 32)),
    Metric("handle_c1_p50", "handle c1 p50", "handle", ("c1_p50_ms",), False, "ms"),
    Metric("handle_cN", "handle c64", "handle", ("cN_calls_per_s",), True, "calls/s"),
    Metric("handle_ing_c1_p50", "ingress handle c1 p50", "handle", ("ingress", "c1_p50_ms"), False, "ms"),
    Metric("handle_ing_cN", "ingress handle c64", "handle", ("ingress", "cN_calls_per_s"), True, "calls/s"),
    Metric("payload_c1_p50", "1 MB POST c1 p50", "payload", ("c1", "p50_ms"), False, "ms"),
    Metric("payload_c8_rps", "1 MB POST c8", "payload", ("c8", "rps"), True, "req/s"),
    Metric("stream_tps", "token streams", "stream", ("tokens_per_s",), True, "tokens/s"),
    Metric("stream_ttft", "token streams TTFT p50", "stream", ("ttft_p50_ms",), False, "ms"),
    Metric("batch_handle", "@serve.batch via handles", "batch", ("fraction_of_ideal",), True, "of ideal"),
    Metric("batch_http", "@serve.batch via HTTP", "batch", ("http", "fraction_of_ideal"), True, "of ideal"),
    Metric("coldstart", "cold start (median)", "coldstart", ("median_s",), False, "s"),
    Metric("coldstart_cli", "cold start, CLI (median)", "coldstart", ("cli", "median_s"), False, "s"),
    Metric("memory", "idle memory (PSS)", "memory", ("pss_mb",), False, "MB"),
    Metric("memory_settled", "idle memory settled (PSS)", "memory", ("settled", "pss_mb"), False, "MB"),
    Metric("idle_cpu", "idle CPU", "memory", ("idle_cpu_cores",), False, "cores", floor=0.01),
    Metric("grpc_unary_c1_p50", "gRPC unary c1 p50", "grpc", ("unary", "c1", "p50_ms"), False, "ms"),
    Metric("grpc_unary_c16", "gRPC unary c16", "grpc", ("unary", "c16", "calls_per_s"), True, "calls/s"),
    Metric("grpc_stream_c16", "gRPC streaming c16", "grpc", ("stream", "c16", "messages_per_s"), True, "messages/s"),
)


def _value(results: dict[str, Any], wl: str, fw: str, path: tuple[str, ...]) -> float | None:
    cur: Any = results.get(wl, {}).get(fw)
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, int | float) else None


def change(new: float, old: float, higher_is_better: bool) -> float:
    """How much better ``new`` is than ``old``, signed: +0.2 = 20 % better, -0.5 = half as good."""
    if higher_is_better:
        return new / old - 1 if old else 0.0
    return old / new - 1 if new else 0.0


def verdict(change: float, tolerance: float) -> str:
    """``change`` as from :func:`change`; within ``tolerance`` either way is noise."""
    if change < -tolerance:
        return "regression"
    if change > tolerance:
        return "better"
    return "same"


def compare(results: dict[str, Any], tolerance: float,
            rounds: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One entry per metric measured under both versions: new, old, new/old, change (+ = better), verdict.

    ``results`` holds one value per metric (with several rounds, their medians); ``rounds``, the
    rounds themselves: each metric then also gets new/old per round, the pair measured minutes
    apart, which shows whether a difference is steady or noise.
    """
    out: list[dict[str, Any]] = []
    for m in METRICS:
        new, old = _value(results, m.workload, "shoal", m.path), _value(results, m.workload, BASELINE, m.path)
        if new is None or old is None:
            continue
        better = change(new, old, m.higher_is_better)
        out.append({"key": m.key, "label": m.label, "unit": m.unit, "higher_is_better": m.higher_is_better,
                    "new": new, "old": old, "new_over_old": new / old if old else None, "change": better,
                    "verdict": "same" if abs(new - old) < m.floor else verdict(better, tolerance)})
        if rounds and len(rounds) > 1:
            pairs = [(_value(r, m.workload, "shoal", m.path), _value(r, m.workload, BASELINE, m.path)) for r in rounds]
            out[-1]["new_over_old_by_round"] = [n / o for n, o in pairs if n is not None and o]
    return out


def _fmt(v: float, unit: str) -> str:
    if unit == "of ideal":
        return f"{v:.0%} of ideal"
    if unit == "cores":
        return f"{v:.1%} of a core"
    if unit == "ms":
        return f"{v:.3f} ms"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:,.0f} {unit}"


def _row(c: dict[str, Any], by_round: bool) -> str:
    ratio = "—" if c["new_over_old"] is None else f"{c['new_over_old']:.3f}"
    mark = f"**{c['verdict']}**" if c["verdict"] == "regression" else c["verdict"]
    cells = [f"{c['label']} ({'higher' if c['higher_is_better'] else 'lower'} is better)",
             _fmt(c["new"], c["unit"]), _fmt(c["old"], c["unit"]), ratio, f"{c['change']:+.1%}", mark]
    if by_round:
        cells.append(", ".join(f"{x:.2f}" for x in c.get("new_over_old_by_round", [])))
    return "| " + " | ".join(cells) + " |"


def markdown(comparison: list[dict[str, Any]], label: str, tolerance: float) -> list[str]:
    """The RESULTS.md section: working tree vs the baseline, metric by metric."""
    if not comparison:
        return []
    by_round = any("new_over_old_by_round" in c for c in comparison)
    head = ["metric", "working tree", label, "new/old", "change", "verdict"]
    head += ["new/old by round"] if by_round else []
    lines = [f"## Working tree vs {label} (same run, interleaved per workload)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [_row(c, by_round) for c in comparison]
    worse = [c["label"] for c in comparison if c["verdict"] == "regression"]
    notes = ["With several rounds (`--rounds`), the two value columns are medians over the rounds."] if by_round else []
    notes += [f"change: + is better for the working tree. Verdicts allow ±{tolerance:.0%} for noise "
              "(`--baseline-tolerance`).",
              f"Regressions: {', '.join(worse)}." if worse else "No regression beyond the tolerance."]
    return [*lines, "", " ".join(notes), ""]
