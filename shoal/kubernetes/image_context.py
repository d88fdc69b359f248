"""``shoal k8s dockerfile --out DIR``: a whole image build context, buildable anywhere.

The directory holds everything ``docker build DIR`` needs and nothing else::

    DIR/Dockerfile          written by shoal.kubernetes.dockerfile
    DIR/.dockerignore       bytecode and the stamp stay out of the image
    DIR/wheels/shoal-*.whl  shoal itself (it is not published on a package index)
    DIR/requirements.txt    the app's requirements (--requirements, or ./requirements.txt)
    DIR/app/...             the app's code, copied to /app: the package each import path
                            names (or --include PATH), as git sees it (ignored files left out)

A second run into the same directory replaces what the first wrote; a directory holding
anything else is refused rather than mixed into an image.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.kubernetes.dockerfile import (
    MARKER,
    DockerfileError,
    DockerfilePlan,
    plan_dockerfile,
    render_dockerfile,
    torch_index_url,
)
from shoal.kubernetes.shoal_wheel import copy_wheel, find_shoal_wheel, temporary_dir, wheel_requirements

__all__ = ["ImageContext", "default_includes", "list_app_files", "plan_in_workdir", "write_image_context"]

STAMP = ".shoal-image-context"
_OURS = ("Dockerfile", ".dockerignore", "requirements.txt", "wheels", "app", STAMP)
# Never copied into an image, whatever git says: bytecode, VCS data, virtualenvs, caches, shoal's secrets.
SKIP_PARTS = frozenset({".git", "__pycache__", ".shoal", ".venv", "venv", ".mypy_cache", ".pytest_cache",
                        ".ruff_cache", ".tox", ".nox", "node_modules"})
SKIP_SUFFIXES = (".pyc", ".pyo")
GIT_TIMEOUT_S = 30.0
DOCKERIGNORE = f"# {MARKER}: only what the Dockerfile copies.\n**/__pycache__\n**/*.pyc\n{STAMP}\n"


@dataclass
class ImageContext:
    out: Path
    plan: DockerfilePlan
    wheel: str | None  # shoal's wheel, relative to out
    files: list[str] = field(default_factory=list)  # the app's files, relative to out/app
    warnings: list[str] = field(default_factory=list)


def default_includes(import_paths: Sequence[str], workdir: Path) -> tuple[list[str], list[str]]:
    """What to copy for each import path: its top-level package, or the whole directory for a module."""
    includes: list[str] = []
    warnings: list[str] = []
    for path in import_paths:
        module = path.partition(":")[0] if ":" in path else path.rpartition(".")[0]
        top = module.split(".")[0]
        if top == "shoal" or not top:
            continue
        if (workdir / top).is_dir():
            pick = top
        elif (workdir / f"{top}.py").is_file():
            pick = "."
            warnings.append(f"import path {path!r} is a top-level module: copying the whole working directory "
                            "(name what the app needs with --include PATH)")
        else:
            warnings.append(f"import path {path!r}: neither {top}/ nor {top}.py is in {workdir}; the image must "
                            "install it (--requirements, --pip) or get it with --include PATH")
            continue
        if pick not in includes:
            includes.append(pick)
    return includes, warnings


def _check_include(path: str, workdir: Path) -> str:
    full = (workdir / path).resolve()
    if not full.exists():
        raise DockerfileError(f"--include {path!r}: no such file or directory in {workdir}")
    if full != workdir and workdir not in full.parents:
        raise DockerfileError(f"--include {path!r}: outside the working directory {workdir}")
    return "." if full == workdir else full.relative_to(workdir).as_posix()


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in SKIP_PARTS for p in parts) or rel.endswith(SKIP_SUFFIXES)


def _git_files(workdir: Path, includes: Sequence[str]) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files under ``includes``; None outside a git work tree."""
    cmd = ["git", "-C", str(workdir), "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *includes]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return [p for p in proc.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def _walk_files(workdir: Path, includes: Sequence[str]) -> list[str]:
    out: list[str] = []
    for inc in includes:
        root = workdir / inc
        if root.is_file():
            out.append(Path(inc).as_posix())
            continue
        for path in root.rglob("*"):
            rel = path.relative_to(workdir).as_posix()
            if not _skipped(rel) and path.is_file():
                out.append(rel)
    return out


def list_app_files(workdir: Path, includes: Sequence[str], exclude: Path) -> list[str]:
    """The files to copy, relative to ``workdir``: git's view when it has one, minus caches and ``exclude``."""
    files = _git_files(workdir, includes)
    if files is None:
        files = _walk_files(workdir, includes)
    keep: list[str] = []
    for rel in sorted(set(files)):
        full = workdir / rel
        if _skipped(rel) or not full.is_file() or full.resolve() == exclude or exclude in full.resolve().parents:
            continue
        keep.append(rel)
    return keep


def _copy_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    # Readable by the pods' non-root user whatever the source's mode; the code stays owned by root.
    dest.chmod(0o755 if src.stat().st_mode & 0o111 else 0o644)


def _prepare(out: Path, workdir: Path) -> None:
    """Make ``out`` an empty context: new, empty, or one this command wrote before (emptied)."""
    if out == workdir or out in workdir.parents:
        raise DockerfileError(f"--out {out}: must not be the working directory or above it")
    if out.exists() and not out.is_dir():
        raise DockerfileError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        dockerfile = out / "Dockerfile"
        ours = (out / STAMP).is_file() or (dockerfile.is_file() and MARKER in dockerfile.read_text("utf-8")[:400])
        if not ours:
            raise DockerfileError(f"--out {out}: not empty and not written by `shoal k8s dockerfile`; "
                                  "choose a new or empty directory")
        for name in _OURS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).write_text(f"{MARKER}\n", encoding="utf-8")


def _shoal_wheel(out: Path, shoal_wheel: str | None, extras: Sequence[str]) -> tuple[str, list[str]]:
    """Copy shoal's wheel into ``out/wheels``; returns its context path and the requirements of ``extras``."""
    with temporary_dir() as tmp:
        copied = copy_wheel(find_shoal_wheel(shoal_wheel, Path(tmp)), out / "wheels")
    provided, by_extra = wheel_requirements(copied)
    unknown = [e for e in extras if e not in provided]
    if unknown:
        raise DockerfileError(f"--extra {unknown[0]!r}: not an extra of {copied.name} (it has {', '.join(provided)})")
    return copied.relative_to(out).as_posix(), [r for e in extras for r in by_extra[e]]


def write_image_context(out: str | Path, *, target: str, workdir: Path, runtime_envs: Sequence[dict[str, Any]],
                        import_paths: Sequence[str], gpu: bool = False, includes: Sequence[str] = (),
                        requirements: str | None = None, shoal_wheel: str | None = None,
                        shoal_spec: str | None = None, extras: Sequence[str] = (), torch_index: str = "auto",
                        base_image: str | None = None, extra_packages: Sequence[str] = ()) -> ImageContext:
    """Write the image context of ``target`` into ``out`` (see the module docstring)."""
    workdir = workdir.resolve()
    out_path = Path(out)
    out_abs = (out_path if out_path.is_absolute() else workdir / out_path).resolve()
    index = torch_index_url(torch_index, gpu)  # a bad flag fails before anything is written
    if shoal_spec and extras:
        raise DockerfileError("--extra applies to shoal's wheel; with --shoal-spec write the extras into it")
    if requirements is not None and not Path(requirements).is_file():
        raise DockerfileError(f"--requirements {requirements!r}: no such file")
    warnings: list[str] = []
    if includes:
        picked = [_check_include(p, workdir) for p in includes]
    else:
        picked, warnings = default_includes(import_paths, workdir)
    files = list_app_files(workdir, picked, out_abs) if picked else []
    # The requirements as the user named them, checked (torch pins) before anything is written.
    plan_dockerfile(runtime_envs, workdir, shoal_spec=shoal_spec or "shoal", extra_packages=extra_packages,
                    requirements=requirements, torch_index=index)
    _prepare(out_abs, workdir)
    wheel, extra_requires = (None, []) if shoal_spec else _shoal_wheel(out_abs, shoal_wheel, extras)
    app = out_abs / "app"
    app.mkdir(exist_ok=True)
    for rel in files:
        _copy_file(workdir / rel, app / rel)
    for env in runtime_envs:  # requirement files named by runtime_env pip, relative to the working directory
        spec = env.get("pip")
        if isinstance(spec, str) and not spec.startswith("/") and (workdir / spec).is_file():
            _copy_file(workdir / spec, app / spec.removeprefix("./"))
    req_src = Path(requirements) if requirements is not None else workdir / "requirements.txt"
    if req_src.is_file():
        _copy_file(req_src, out_abs / "requirements.txt")
    plan = plan_dockerfile(runtime_envs, out_abs, base_image=base_image, shoal_spec=shoal_spec,
                           extra_packages=extra_packages, shoal_wheel=wheel, extras=extras,
                           extra_requires=extra_requires, requirements="requirements.txt", torch_index=index,
                           app_dir="app", context_hint=str(out))
    (out_abs / "Dockerfile").write_text(render_dockerfile(plan, target), encoding="utf-8")
    (out_abs / ".dockerignore").write_text(DOCKERIGNORE, encoding="utf-8")
    return ImageContext(out=out_abs, plan=plan, wheel=wheel, files=files, warnings=warnings + plan.warnings)


def _inside(path: str, workdir: Path, option: str) -> str:
    full = Path(path).resolve()
    if workdir not in full.parents:
        raise DockerfileError(f"{option} {path!r}: must be inside the build context {workdir} (or use --out DIR)")
    return full.relative_to(workdir).as_posix()


def _source_extras(tree: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The extras of shoal's pyproject.toml in its source tree, as :func:`wheel_requirements` reads a wheel's."""
    import tomllib

    try:
        with (tree / "pyproject.toml").open("rb") as f:
            extras = dict(tomllib.load(f).get("project", {}).get("optional-dependencies", {}))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DockerfileError(f"{tree / 'pyproject.toml'}: {e}") from None
    return list(extras), {k: [str(r) for r in v] for k, v in extras.items()}


def plan_in_workdir(workdir: Path, *, runtime_envs: Sequence[dict[str, Any]], gpu: bool = False,
                    requirements: str | None = None, shoal_wheel: str | None = None, shoal_spec: str | None = None,
                    extras: Sequence[str] = (), torch_index: str = "auto", base_image: str | None = None,
                    extra_packages: Sequence[str] = ()) -> DockerfilePlan:
    """The Dockerfile plan for the working directory as build context (``-o FILE``, or stdout)."""
    from shoal.kubernetes.shoal_wheel import check_wheel, is_shoal_source

    workdir = workdir.resolve()
    index = torch_index_url(torch_index, gpu)
    if shoal_spec and extras:
        raise DockerfileError("--extra applies to shoal's wheel; with --shoal-spec write the extras into it")
    req = None
    if requirements is not None:
        if not Path(requirements).is_file():
            raise DockerfileError(f"--requirements {requirements!r}: no such file")
        req = _inside(requirements, workdir, "--requirements")
    wheel = None
    provided: list[str] = []
    by_extra: dict[str, list[str]] = {}
    if shoal_wheel is not None and not shoal_spec:
        wheel = _inside(str(check_wheel(Path(shoal_wheel))), workdir, "--shoal-wheel")
        provided, by_extra = wheel_requirements(workdir / wheel)
    elif not shoal_spec and is_shoal_source(workdir):
        provided, by_extra = _source_extras(workdir)
    unknown = [e for e in extras if e not in provided]
    if unknown:
        raise DockerfileError(f"--extra {unknown[0]!r}: not an extra of shoal (it has {', '.join(provided)})")
    return plan_dockerfile(runtime_envs, workdir, base_image=base_image, shoal_spec=shoal_spec,
                           extra_packages=extra_packages, shoal_wheel=wheel, extras=extras,
                           extra_requires=[r for e in extras for r in by_extra[e]], requirements=req,
                           torch_index=index)
