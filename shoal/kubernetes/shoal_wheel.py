"""shoal's own wheel, for an image that installs the same shoal that wrote its Dockerfile.

shoal is not published on a package index, so an image cannot ``pip install shoal``: it
installs a wheel copied into its build context. That wheel is, in this order, the file given
with ``--shoal-wheel``, a wheel built with ``python -m build`` from the source tree the running
shoal is imported from (a clone, installed editable or not at all), or the wheel file the
running shoal was installed from (``direct_url.json``, PEP 610). ``make dist`` builds the same
wheel as a release artifact.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = [
    "BUILD_TIMEOUT_S",
    "WheelError",
    "build_wheel",
    "check_wheel",
    "copy_wheel",
    "find_shoal_wheel",
    "is_shoal_source",
    "source_tree",
    "temporary_dir",
    "wheel_requirements",
]

#: Bound on ``python -m build`` (an sdist, then the wheel from it: seconds without isolation).
BUILD_TIMEOUT_S = 300.0
# PEP 427: {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl
_WHEEL_NAME = re.compile(r"^shoal-[^-]+(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class WheelError(ValueError):
    """No usable wheel of shoal: the message says which option or package to use instead."""


def is_shoal_source(path: Path) -> bool:
    """Whether ``path`` is the root of shoal's source tree (its pyproject names the project shoal)."""
    try:
        text = (path / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r'^name\s*=\s*"shoal"\s*$', text, re.MULTILINE) is not None


def source_tree() -> Path | None:
    """The source checkout the running shoal is imported from, or None for an installed wheel."""
    import shoal

    root = Path(shoal.__file__).resolve().parent.parent
    return root if is_shoal_source(root) else None


def _installed_from() -> Path | None:
    """The local wheel file or source directory the running shoal was installed from, if recorded."""
    try:
        text = distribution("shoal").read_text("direct_url.json")
    except PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        url = urlparse(str(json.loads(text).get("url", "")))
    except (ValueError, AttributeError):
        return None
    if url.scheme != "file":
        return None
    path = Path(unquote(url.path))
    if path.is_file() and path.suffix == ".whl":
        return path
    return path if path.is_dir() and is_shoal_source(path) else None


def _setuptools_ok() -> bool:
    """Whether this interpreter can build shoal without an isolated environment (which downloads)."""
    try:
        major = int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return False
    return major >= 77  # the floor in pyproject.toml's [build-system]


def build_wheel(src: Path, outdir: Path, *, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """Build shoal's sdist and wheel from ``src`` into ``outdir``; returns the wheel.

    The wheel is built from the sdist in a temporary directory (``build``'s default), so files
    left in the tree's ``build/`` by earlier builds never reach it.
    """
    if importlib.util.find_spec("build") is None:
        raise WheelError(
            f"building shoal's wheel from {src} needs the 'build' package (pip install build; it is in shoal's "
            "dev extra), or pass --shoal-wheel PATH (`make dist` writes one to dist/)"
        )
    cmd = [sys.executable, "-m", "build", "--outdir", str(outdir)]
    if _setuptools_ok():
        cmd.append("--no-isolation")
    cmd.append(str(src))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise WheelError(f"building shoal's wheel from {src} took more than {timeout_s:.0f} s: "
                         f"{' '.join(cmd)}") from None
    wheels = sorted(outdir.glob("shoal-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise WheelError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return wheels[0]


def check_wheel(path: Path, option: str = "--shoal-wheel") -> Path:
    """``path`` if it is a readable wheel of shoal; otherwise an error naming ``option``."""
    if not path.is_file():
        raise WheelError(f"{option} {str(path)!r}: no such file")
    if not _WHEEL_NAME.match(path.name):
        raise WheelError(f"{option} {str(path)!r}: not a wheel of shoal (expected shoal-VERSION-py3-none-any.whl)")
    try:
        with zipfile.ZipFile(path) as zf:
            zf.getinfo("shoal/__init__.py")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise WheelError(f"{option} {str(path)!r}: not a wheel of shoal ({e})") from None
    return path


def find_shoal_wheel(explicit: str | None, workdir: Path) -> Path:
    """A wheel of shoal to copy into an image context; built ones go to ``workdir`` (a temporary dir)."""
    if explicit:
        return check_wheel(Path(explicit))
    src = source_tree()
    installed = _installed_from()
    if src is None and installed is not None and installed.is_dir():
        src = installed
    if src is not None:
        return build_wheel(src, workdir)
    if installed is not None:
        return check_wheel(installed, "the wheel shoal was installed from,")
    raise WheelError(
        "cannot find shoal's wheel: the running shoal is neither a source checkout nor installed from a local wheel "
        "file; pass --shoal-wheel PATH (`make dist` in a clone of shoal writes one to dist/)"
    )


def wheel_requirements(wheel: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The extras a wheel provides and the requirements each extra adds (from its METADATA)."""
    with zipfile.ZipFile(wheel) as zf:
        name = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise WheelError(f"{wheel.name}: no METADATA in the wheel")
        meta = Parser().parsestr(zf.read(name).decode("utf-8"))
    extras = [str(e) for e in meta.get_all("Provides-Extra") or []]
    by_extra: dict[str, list[str]] = {e: [] for e in extras}
    for line in meta.get_all("Requires-Dist") or []:
        req, _, marker = str(line).partition(";")
        found = _EXTRA_MARKER.search(marker)
        if found and found.group(1) in by_extra:
            by_extra[found.group(1)].append(req.strip())
    return extras, by_extra


def copy_wheel(wheel: Path, dest_dir: Path) -> Path:
    """Copy the wheel into ``dest_dir`` (created), readable by everyone; returns the copy."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / wheel.name
    shutil.copyfile(wheel, dest)
    dest.chmod(0o644)
    return dest


def temporary_dir() -> tempfile.TemporaryDirectory[str]:
    """Where a built wheel waits before it is copied into the context."""
    return tempfile.TemporaryDirectory(prefix="shoal-wheel-")
