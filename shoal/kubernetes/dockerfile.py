"""A Dockerfile for an application's image (``shoal k8s dockerfile``).

One image serves every deployment of an app: a slim Python base, a non-root user (uid
10001, the ``runAsUser`` of the generated pods), shoal, the app's requirements (a
``requirements.txt`` in the build context, and each ``runtime_env`` ``pip`` list of the
config), then the working directory as ``/app``. The entrypoint is ``shoal replica``; the
pod spec names the deployment.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.kubernetes import names
from shoal.kubernetes.compiler import CACHE_DIR, RUN_AS_USER

__all__ = ["DockerfilePlan", "plan_dockerfile", "render_dockerfile"]


@dataclass
class DockerfilePlan:
    base_image: str
    shoal_spec: str | None  # pip requirement for shoal; None: installed from the copied source
    requirements_file: bool
    packages: list[str] = field(default_factory=list)
    requirement_files: list[str] = field(default_factory=list)  # runtime_env pip given as a file path
    warnings: list[str] = field(default_factory=list)


def _is_shoal_source(context: Path) -> bool:
    try:
        text = (context / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r'^name\s*=\s*"shoal"\s*$', text, re.MULTILINE) is not None


def _shoal_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shoal")
    except PackageNotFoundError:
        return "0.1.0"


def plan_dockerfile(runtime_envs: Sequence[dict[str, Any]], context: str | Path = ".", *,
                    base_image: str | None = None, shoal_spec: str | None = None,
                    extra_packages: Sequence[str] = ()) -> DockerfilePlan:
    """Decide what the image installs, from the app's runtime_envs, ``--pip`` and the build context."""
    ctx = Path(context)
    plan = DockerfilePlan(
        base_image=base_image or f"python:{sys.version_info.major}.{sys.version_info.minor}-slim",
        shoal_spec=shoal_spec,
        requirements_file=(ctx / "requirements.txt").is_file(),
    )
    if shoal_spec is None and not _is_shoal_source(ctx):
        plan.shoal_spec = f"shoal=={_shoal_version()}"
    plan.packages.extend(p for p in extra_packages if p not in plan.packages)
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
    return plan


def render_dockerfile(plan: DockerfilePlan, target: str) -> str:
    uid = RUN_AS_USER
    lines = [
        "# syntax=docker/dockerfile:1",
        f"# The image of {target}, written by `shoal k8s dockerfile`.",
        "#   docker build -t REGISTRY/NAME:TAG .",
        "#   shoal k8s build ... --image REGISTRY/NAME:TAG",
        "# Keep .git, virtualenvs and caches out of the build context with a .dockerignore.",
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
    if plan.requirements_file:
        lines += [
            "# Dependencies before the code, so a code change rebuilds only the last layers.",
            "COPY requirements.txt /tmp/requirements.txt",
            "RUN pip install -r /tmp/requirements.txt",
        ]
    if plan.packages:
        lines.append("# runtime_env pip of the serve config, and --pip")
        lines.append("RUN pip install " + " ".join(shlex.quote(p) for p in plan.packages))
    if plan.shoal_spec is not None:
        lines.append("RUN pip install " + shlex.quote(plan.shoal_spec))
    lines += ["", "# The application code (owned by root: the app cannot change it).", "COPY . /app"]
    if plan.shoal_spec is None:
        lines.append("# The build context is shoal's own source tree: install it.")
        lines.append("RUN pip install /app")
    for path in plan.requirement_files:
        in_image = path if path.startswith("/") else "/app/" + path.removeprefix("./")
        lines.append("RUN pip install -r " + shlex.quote(in_image))
    lines += [
        "",
        f"USER {uid}:{uid}",
        f"EXPOSE {names.HTTP_PORT} {names.ADMIN_PORT} {names.RPC_PORT}",
        'ENTRYPOINT ["shoal", "replica"]',
        "",
    ]
    return "\n".join(lines)
