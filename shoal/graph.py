"""Pictures of deployment graphs: Mermaid and Graphviz DOT text, and SVG/PNG through ``dot``.

The text formats are pure functions of built application specs
(:class:`~shoal.deployment.AppSpec`), so they are cheap to test and to embed (GitHub renders
Mermaid in Markdown). Each node is one deployment with what decides its cost and capacity::

    RAGApp                      <- name
    ingress · route /           <- only the ingress
    replicas: 1                 <- or "replicas: 0-4 auto, target 2/replica"
    cpu 1 · gpu 0.5 · mem 2 GiB <- ray_actor_options (num_cpus defaults to 1, as in Ray)
    max_ongoing_requests: 5

Edges are the call graph (:meth:`AppSpec.edges`): caller -> callee for every handle a
deployment was bound with. ``shoal graph`` is the command-line front end.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.deployment import AppSpec, DeploymentSpec

__all__ = [
    "FORMATS",
    "GraphvizNotFoundError",
    "NodeInfo",
    "describe",
    "load_app_specs",
    "render",
    "render_graphviz",
    "to_dot",
    "to_mermaid",
]

FORMATS = ("mermaid", "dot", "svg", "png")

_INSTALL_HINT = (
    "Graphviz's `dot` command is needed to render {fmt} but is not installed; install it with "
    "`apt-get install graphviz` (Debian/Ubuntu) or `brew install graphviz` (macOS), "
    "or use --format mermaid / --format dot, which need nothing"
)


class GraphvizNotFoundError(RuntimeError):
    """Rendering SVG or PNG needs Graphviz's ``dot`` executable, which was not found."""


@dataclass(frozen=True)
class NodeInfo:
    """What a graph node shows about one deployment."""

    app: str
    name: str
    ingress: bool
    route_prefix: str | None
    replicas: str
    resources: str
    max_ongoing_requests: int

    def lines(self) -> list[str]:
        """The label's lines after the name."""
        out: list[str] = []
        if self.ingress:
            out.append(f"ingress · route {self.route_prefix}" if self.route_prefix else "ingress · no HTTP route")
        out += [self.replicas, self.resources, f"max_ongoing_requests: {self.max_ongoing_requests}"]
        return out


def _num(x: float) -> str:
    """1.0 -> "1", 0.25 -> "0.25"."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{_num(round(n / size, 2))} {unit}"
    return f"{_num(n)} B"


def _replicas(spec: DeploymentSpec) -> str:
    auto = spec.config.resolved_autoscaling()
    if auto is None:
        n = spec.config.initial_target()
        return f"replicas: {n}"
    return (f"replicas: {auto.min_replicas}-{auto.max_replicas} auto, "
            f"target {_num(auto.target_ongoing_requests)}/replica")


def _resources(spec: DeploymentSpec) -> str:
    opts = spec.config.ray_actor_options
    parts = [f"cpu {_num(opts.effective_num_cpus)}"]
    if opts.num_gpus:
        parts.append(f"gpu {_num(opts.num_gpus)}")
    if opts.memory:
        parts.append(f"mem {_bytes(opts.memory)}")
    parts += [f"{k} {_num(v)}" for k, v in sorted(opts.resources.items())]
    return " · ".join(parts)


def describe(spec: AppSpec) -> list[NodeInfo]:
    """One :class:`NodeInfo` per deployment of ``spec``: the ingress first, then in graph order."""
    order = [spec.ingress] + [n for n in spec.deployments if n != spec.ingress]
    out = []
    for name in order:
        d = spec.deployments[name]
        out.append(NodeInfo(app=spec.name, name=name, ingress=d.ingress, route_prefix=spec.route_prefix,
                            replicas=_replicas(d), resources=_resources(d),
                            max_ongoing_requests=d.config.max_ongoing_requests))
    return out


class _Ids:
    """Stable identifiers that are valid in both Mermaid and DOT, unique across applications."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, ...], str] = {}
        self._used: set[str] = set()

    def __call__(self, *key: str) -> str:
        if key not in self._ids:
            base = re.sub(r"\W", "_", "__".join(key), flags=re.ASCII)
            ident, k = base, 2
            while ident in self._used:
                ident, k = f"{base}_{k}", k + 1
            self._used.add(ident)
            self._ids[key] = ident
        return self._ids[key]


def _as_list(specs: AppSpec | Sequence[AppSpec]) -> list[AppSpec]:
    return [specs] if isinstance(specs, AppSpec) else list(specs)


# --------------------------------------------------------------------------------------------
# Mermaid


def _mermaid_text(s: str) -> str:
    # Inside a quoted Mermaid label, HTML entities written as #name; are decoded.
    return (s.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;"))


def to_mermaid(specs: AppSpec | Sequence[AppSpec], *, direction: str = "LR") -> str:
    """A Mermaid ``flowchart`` of one or more applications (one subgraph per application)."""
    ident = _Ids()
    lines = [f"flowchart {direction}"]
    edges: list[str] = []
    for spec in _as_list(specs):
        group = ident("app", spec.name)
        lines.append(f'  subgraph {group}["application {_mermaid_text(spec.name)}"]')
        for node in describe(spec):
            label = "<br/>".join([f"<b>{_mermaid_text(node.name)}</b>", *map(_mermaid_text, node.lines())])
            node_id = ident("dep", spec.name, node.name)
            lines.append(f'    {node_id}["{label}"]')
        lines.append("  end")
        if spec.route_prefix is not None:
            http = ident("http", spec.name)
            lines.append(f'  {http}(["HTTP {_mermaid_text(spec.route_prefix)}"])')
            edges.append(f"  {http} --> {ident('dep', spec.name, spec.ingress)}")
        edges += [f"  {ident('dep', spec.name, a)} --> {ident('dep', spec.name, b)}" for a, b in spec.edges()]
    lines += edges
    ingresses = [ident("dep", s.name, s.ingress) for s in _as_list(specs)]
    lines.append("  classDef ingress fill:#fdf1dc,stroke:#c77d00")
    if ingresses:
        lines.append(f"  class {','.join(ingresses)} ingress")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# DOT


def _dot_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot_label(node: NodeInfo) -> str:
    rows = [f"<b>{html.escape(node.name)}</b>", *(html.escape(line) for line in node.lines())]
    return "<" + "<br/>".join(rows) + ">"


def to_dot(specs: AppSpec | Sequence[AppSpec], *, direction: str = "LR") -> str:
    """A Graphviz DOT ``digraph`` of one or more applications (one cluster per application)."""
    ident = _Ids()
    lines = [
        "digraph shoal {",
        f"  rankdir={direction};",
        '  graph [fontname="Helvetica", fontsize=11, nodesep=0.3, ranksep=0.5];',
        '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", color="#4a6fa5", '
        'fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555", arrowsize=0.7];',
    ]
    edges: list[str] = []
    for spec in _as_list(specs):
        lines.append(f"  subgraph {ident('cluster', spec.name)} {{")
        lines.append(f"    label={_dot_string('application ' + spec.name)};")
        lines.append('    style="rounded,dashed"; color="#999999";')
        for node in describe(spec):
            extra = ', fillcolor="#fdf1dc", color="#c77d00"' if node.ingress else ""
            lines.append(f"    {ident('dep', spec.name, node.name)} [label={_dot_label(node)}{extra}];")
        lines.append("  }")
        if spec.route_prefix is not None:
            http = ident("http", spec.name)
            lines.append(f"  {http} [label={_dot_string('HTTP ' + spec.route_prefix)}, shape=oval, "
                         'style=filled, fillcolor="#ffffff"];')
            edges.append(f"  {http} -> {ident('dep', spec.name, spec.ingress)};")
        edges += [f"  {ident('dep', spec.name, a)} -> {ident('dep', spec.name, b)};" for a, b in spec.edges()]
    lines += edges
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# SVG / PNG


def render_graphviz(dot_text: str, fmt: str, *, dot: str | None = None, timeout_s: float = 60.0) -> bytes:
    """Run Graphviz's ``dot`` on ``dot_text`` and return the ``svg`` or ``png`` bytes.

    Raises :class:`GraphvizNotFoundError` (saying how to install it) when ``dot`` is missing,
    and RuntimeError when it fails.
    """
    if fmt not in ("svg", "png"):
        raise ValueError(f"Graphviz output format must be 'svg' or 'png', got {fmt!r}")
    exe = dot or shutil.which("dot")
    if exe is None:
        raise GraphvizNotFoundError(_INSTALL_HINT.format(fmt=fmt.upper()))
    try:
        proc = subprocess.run([exe, f"-T{fmt}"], input=dot_text.encode(), capture_output=True,
                              timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise GraphvizNotFoundError(_INSTALL_HINT.format(fmt=fmt.upper())) from None
    if proc.returncode != 0:
        raise RuntimeError(f"dot -T{fmt} failed (exit {proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def render(specs: AppSpec | Sequence[AppSpec], fmt: str = "mermaid") -> bytes:
    """The graph in ``fmt`` (one of :data:`FORMATS`) as bytes."""
    if fmt == "mermaid":
        return to_mermaid(specs).encode()
    if fmt == "dot":
        return to_dot(specs).encode()
    if fmt in ("svg", "png"):
        return render_graphviz(to_dot(specs), fmt)
    raise ValueError(f"unknown graph format {fmt!r}; choose one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------
# Loading


def load_app_specs(target: str, *, name: str | None = None, route_prefix: str | None = None) -> list[AppSpec]:
    """Build the AppSpecs ``shoal graph`` draws, without running anything.

    ``target`` is a serve config file (every application, with its ``deployments``
    overrides applied) or an import path to a bound application or an application builder
    (``module:app``), named ``name`` and routed at ``route_prefix`` ("none": no route).
    Problems raise :class:`~shoal.schema.ConfigError`, ImportError, AttributeError or ValueError.
    """
    from shoal.deployment import build_app_spec
    from shoal.loader import build_application
    from shoal.schema import ServeDeploySchema, load_config_file

    if target.endswith((".yaml", ".yml", ".json")) and ":" not in target.rsplit("/", 1)[-1]:
        config = load_config_file(target)
        source = target
    else:
        entry: dict[str, object] = {"import_path": target, "name": name or "default"}
        if route_prefix is not None:
            entry["route_prefix"] = None if route_prefix.lower() == "none" else route_prefix
        config = ServeDeploySchema.from_dict({"applications": [entry]}, source="command line")
        source = "command line"
    return [
        build_app_spec(build_application(a, source=source, index=i), a.name, a.route_prefix)
        for i, a in enumerate(config.applications)
    ]
