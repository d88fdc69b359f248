"""A Dockerfile for an application's image (``shoal k8s dockerfile``).

One image serves every deployment of an app: a slim Python base, a non-root user (uid
10001, the ``runAsUser`` of the generated pods), torch from the index that matches the
hardware (if anything installs torch), the app's requirements (``--requirements``, a
``requirements.txt``, the ``pip`` lists of every ``runtime_env`` and ``--pip``), shoal, then
the app's code as ``/app``. The entrypoint is ``shoal replica``; the pod spec names the
deployment.

shoal is not published on a package index, so the image never runs ``pip install shoal``: with
``--out DIR`` the Dockerfile is written into a whole image context that holds shoal's wheel
(see :mod:`shoal.kubernetes.shoal_wheel`), the requirements and the app's code
(:mod:`shoal.kubernetes.image_context`); with ``-o FILE`` the working directory is the context
and shoal comes from the source tree (when that directory is shoal's own), ``--shoal-wheel`` or
``--shoal-spec``.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.kubernetes import names
from shoal.kubernetes.compiler import CACHE_DIR, RUN_AS_USER
from shoal.kubernetes.shoal_wheel import is_shoal_source

__all__ = [
    "MARKER",
    "TORCH_CPU_INDEX",
    "DockerfileError",
    "DockerfilePlan",
    "config_uses_gpus",
    "plan_dockerfile",
    "render_dockerfile",
    "torch_index_url",
    "torch_specs",
]

#: In the second line of every Dockerfile this module writes (``--out`` replaces only its own).
MARKER = "written by `shoal k8s dockerfile`"
#: PyTorch's index of CPU-only wheels; PyPI's Linux x86_64 torch wheels are CUDA builds of several GB.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_PACKAGES = frozenset({"torch", "torchvision", "torchaudio"})
#: Where the context's wheels are copied to in the image, for one RUN step (then removed).
WHEELS_IN_IMAGE = "/tmp/wheels"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")
_PINNED = re.compile(r"^===?\s*[0-9][^,;\s*]*\s*(;.*)?$")


class DockerfileError(ValueError):
    """A flag or requirement the image cannot be built from: the message names it."""


@dataclass
class DockerfilePlan:
    base_image: str
    shoal_spec: str | None  # pip requirement for shoal (--shoal-spec); None: shoal_wheel, or the copied source
    requirements_file: bool  # a requirements file is installed before the code
    packages: list[str] = field(default_factory=list)
    requirement_files: list[str] = field(default_factory=list)  # runtime_env pip given as a file path
    warnings: list[str] = field(default_factory=list)
    requirements_path: str = "requirements.txt"  # that file, relative to the context
    shoal_wheel: str | None = None  # shoal's wheel, relative to the context
    extras: list[str] = field(default_factory=list)  # shoal's extras installed with it
    torch: list[str] = field(default_factory=list)  # torch requirements, installed first from torch_index
    torch_index: str | None = None  # None: pip's default index
    app_dir: str = "."  # the context directory copied to /app
    context_hint: str = "."  # the context as named in the header's `docker build` line


def config_uses_gpus(config: Any) -> bool:
    """Whether a serve config asks for GPUs anywhere (``ray_actor_options.num_gpus``); imports nothing."""
    for app in config.applications:
        for dep in app.deployments:
            rao = dep.options().get("ray_actor_options") or {}
            if isinstance(rao, dict) and float(rao.get("num_gpus") or 0) > 0:
                return True
    return False


def torch_index_url(choice: str, gpu: bool) -> str | None:
    """The index torch comes from: ``auto`` is ``cuda`` when the config asks for GPUs, else ``cpu``."""
    if choice == "auto":
        choice = "cuda" if gpu else "cpu"
    if choice == "cpu":
        return TORCH_CPU_INDEX
    if choice == "cuda":
        return None  # PyPI's Linux wheels of torch are its CUDA builds
    if choice.startswith(("https://", "http://")):
        return choice
    raise DockerfileError(f"--torch-index {choice!r}: expected auto, cpu, cuda or an index URL")


def _requirement_lines(text: str) -> Iterable[tuple[int, str]]:
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            yield number, line


def torch_specs(entries: Iterable[tuple[str, str]]) -> list[str]:
    """The torch-family requirements among ``(where, requirement)``; each must be pinned with ``==``.

    An unpinned torch takes whatever build the index has: on Linux from PyPI a CUDA build of
    several GB, and a different one next month. Requirements by URL (``torch @ https://...``)
    carry their own build and are left to their line.
    """
    found: dict[str, str] = {}
    for where, line in entries:
        m = _NAME.match(line)
        if m is None or m.group(1).lower().replace("_", "-") not in TORCH_PACKAGES:
            continue
        name, rest = m.group(1).lower(), m.group(3).strip()
        if rest.startswith("@"):
            continue
        if not _PINNED.match(rest):
            raise DockerfileError(
                f"{where}: {line!r}: pin {name} with == (e.g. torch==2.13.0); an unpinned {name} pulls whatever "
                "build the index has, on Linux a CUDA build of several GB"
            )
        req, sep, marker = line.partition(";")
        spec = re.sub(r"\s+", "", req) + (f"; {marker.strip()}" if sep else "")
        if name in found and found[name] != spec:
            raise DockerfileError(f"{where}: {line!r} conflicts with {found[name]!r}")
        found[name] = spec
    return list(found.values())


def _file_entries(label: str, path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [(f"{label} line {number}", line) for number, line in _requirement_lines(text)]


def _runtime_env_pip(plan: DockerfilePlan, runtime_envs: Sequence[dict[str, Any]]) -> None:
    for env in runtime_envs:
        for key in ("pip", "uv"):
            spec = env.get(key)
            if spec is None:
                continue
            if isinstance(spec, dict):
                spec = spec.get("packages", [])
            if isinstance(spec, str):
                if spec not in plan.requirement_files:
                    plan.requirement_files.append(spec)
            elif isinstance(spec, list):
                for pkg in spec:
                    if str(pkg) not in plan.packages:
                        plan.packages.append(str(pkg))
        if env.get("conda"):
            plan.warnings.append("runtime_env conda is not supported in the image; list the packages under pip")
        wd = env.get("working_dir")
        if isinstance(wd, str) and "://" in wd:
            plan.warnings.append(
                f"runtime_env working_dir {wd!r} is remote; the image holds the build context instead"
            )


def plan_dockerfile(runtime_envs: Sequence[dict[str, Any]], context: str | Path = ".", *,
                    base_image: str | None = None, shoal_spec: str | None = None,
                    extra_packages: Sequence[str] = (), shoal_wheel: str | None = None,
                    extras: Sequence[str] = (), extra_requires: Sequence[str] = (),
                    requirements: str | None = None, torch_index: str | None = TORCH_CPU_INDEX,
                    app_dir: str = ".", context_hint: str = ".") -> DockerfilePlan:
    """Decide what the image installs, from the app's runtime_envs, the flags and the build context.

    ``shoal_wheel`` and ``requirements`` are paths relative to ``context``; ``extra_requires``
    are the requirements shoal's ``extras`` add (from its wheel), scanned for torch.
    """
    ctx = Path(context)
    req_path = requirements if requirements is not None else "requirements.txt"
    plan = DockerfilePlan(
        base_image=base_image or f"python:{sys.version_info.major}.{sys.version_info.minor}-slim",
        shoal_spec=shoal_spec,
        requirements_file=(ctx / req_path).is_file(),
        requirements_path=req_path,
        shoal_wheel=None if shoal_spec else shoal_wheel,
        extras=list(extras),
        torch_index=torch_index,
        app_dir=app_dir,
        context_hint=context_hint,
    )
    if shoal_spec is None and shoal_wheel is None and not is_shoal_source(ctx / app_dir):
        raise DockerfileError(
            "shoal is not published on a package index, so the image cannot `pip install shoal`: write a whole image "
            "context with --out DIR (it holds shoal's wheel), or pass --shoal-wheel PATH (a wheel inside the build "
            "context) or --shoal-spec REQUIREMENT (an index or URL you publish shoal to)"
        )
    plan.packages.extend(p for p in extra_packages if p not in plan.packages)
    _runtime_env_pip(plan, runtime_envs)
    entries: list[tuple[str, str]] = []
    if plan.requirements_file:
        entries += _file_entries(f"requirements {req_path}", ctx / req_path)
    entries += [("pip requirement (--pip, runtime_env pip)", p) for p in plan.packages]
    for path in plan.requirement_files:
        if not path.startswith("/"):
            entries += _file_entries(f"runtime_env pip {path}", ctx / app_dir / path)
    entries += [(f"shoal[{','.join(extras)}] requirement", r) for r in extra_requires]
    plan.torch = torch_specs(entries)
    return plan


def _install_lines(plan: DockerfilePlan) -> list[str]:
    """torch, then the app's requirements in one pip call, then shoal's wheel: the layers before the code."""
    lines: list[str] = []
    if plan.torch:
        where = plan.torch_index or "PyPI (its Linux wheels are CUDA builds)"
        index = f"--index-url {shlex.quote(plan.torch_index)} " if plan.torch_index else ""
        lines += [f"# torch first, from {where} as --torch-index says; the requirements below find it installed.",
                  "RUN pip install " + index + " ".join(shlex.quote(t) for t in plan.torch)]
    deps = [shlex.quote(p) for p in plan.packages] + ([shlex.quote(plan.shoal_spec)] if plan.shoal_spec else [])
    if plan.requirements_file:
        lines += ["# Dependencies before the code, so a code change rebuilds only the last layers.",
                  f"COPY {plan.requirements_path} /tmp/requirements.txt"]
        deps.insert(0, "-r /tmp/requirements.txt")
    elif deps:
        lines.append("# runtime_env pip of the serve config, and --pip")
        if plan.torch:  # torch keeps a layer of its own: a change to these does not download it again
            lines.append("# hadolint ignore=DL3059")
    if deps:
        lines.append("RUN pip install " + " ".join(deps))
    if plan.shoal_spec is None and plan.shoal_wheel is not None:
        extras = f"[{','.join(plan.extras)}]" if plan.extras else ""
        name = Path(plan.shoal_wheel).name
        lines += [
            "# shoal from its wheel in the build context (shoal is not published on a package index).",
            f"COPY {plan.shoal_wheel} {WHEELS_IN_IMAGE}/",
            "RUN pip install " + shlex.quote(f"{WHEELS_IN_IMAGE}/{name}{extras}")
            + f" \\\n && rm -rf {WHEELS_IN_IMAGE}",
        ]
    return lines


def render_dockerfile(plan: DockerfilePlan, target: str) -> str:
    uid = RUN_AS_USER
    whole_context = plan.app_dir == "."
    lines = [
        "# syntax=docker/dockerfile:1",
        f"# The image of {target}, {MARKER}.",
        f"#   docker build -t REGISTRY/NAME:TAG {plan.context_hint}",
        "#   shoal k8s build ... --image REGISTRY/NAME:TAG",
        "# Keep .git, virtualenvs and caches out of the build context with a .dockerignore." if whole_context else
        "# This directory is the build context: shoal's wheel, the app's requirements and its code.",
        f"FROM {plan.base_image}",
        "",
        "ENV PYTHONUNBUFFERED=1 \\",
        "    PYTHONDONTWRITEBYTECODE=1 \\",
        "    PIP_NO_CACHE_DIR=1 \\",
        "    PIP_DISABLE_PIP_VERSION_CHECK=1",
        "",
        f"# The pods run as uid {uid} with a read-only root filesystem; {CACHE_DIR} is an emptyDir there.",
        f"RUN groupadd --system --gid {uid} shoal \\",
        f" && useradd --system --uid {uid} --gid {uid} --home-dir {CACHE_DIR} --no-create-home "
        "--shell /usr/sbin/nologin shoal",
        "",
        "WORKDIR /app",
    ]
    lines += _install_lines(plan)
    app_src = "." if whole_context else plan.app_dir.rstrip("/") + "/"
    lines += ["", "# The application code (owned by root: the app cannot change it).", f"COPY {app_src} /app"]
    after: list[str] = []
    if plan.shoal_spec is None and plan.shoal_wheel is None:
        extras = f"[{','.join(plan.extras)}]" if plan.extras else ""
        lines.append("# The build context is shoal's own source tree: install it.")
        after.append(shlex.quote(f"/app{extras}"))
    for path in plan.requirement_files:
        in_image = path if path.startswith("/") else "/app/" + path.removeprefix("./")
        after.append("-r " + shlex.quote(in_image))
    if after:
        lines.append("RUN pip install " + " ".join(after))
    lines += [
        "",
        f"USER {uid}:{uid}",
        f"EXPOSE {names.HTTP_PORT} {names.ADMIN_PORT} {names.RPC_PORT}",
        'ENTRYPOINT ["shoal", "replica"]',
        "",
    ]
    return "\n".join(lines)
