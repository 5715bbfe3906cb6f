"""Installing as users do: `python -m build`, then a plain `pip install` of the wheel and of the sdist
into a fresh virtual environment that has only torch. Neither build sees torch (pip's isolation),
so the package compiles its extension for the running torch on first use, once, and the cpp
backend is available from either. And an extension built for another torch is never loaded."""
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kwargs):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=1500, **kwargs)


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory):
    """A venv with torch (the running version) and nothing else, and the built sdist and wheel."""
    tmp = tmp_path_factory.mktemp("install")
    venv.create(tmp / "venv", with_pip=True)
    python = tmp / "venv" / "bin" / "python"
    torch_spec = f"torch=={torch.__version__.split('+')[0]}"
    proc = run([python, "-m", "pip", "install", "-q", torch_spec])
    if proc.returncode != 0:
        pytest.skip(f"could not install {torch_spec} into a fresh venv (no package index here?): {proc.stderr[-500:]}")
    proc = run([sys.executable, "-m", "build", "--outdir", tmp / "dist", ROOT])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return python, tmp


def report(python, cache):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "TRITON_INTERPRET": "0"}
    proc = run([python, "-m", "msplora_kernels", "--json"], env=env, cwd=cache.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_the_sdist_holds_everything_a_build_needs(fresh_env):
    import tarfile

    _, tmp = fresh_env
    (sdist,) = (tmp / "dist").glob("msplora_kernels-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("setup.py", "pyproject.toml", "msplora_kernels/_build.py", "csrc/msplora_ops.cpp", "csrc/settings.h",
                   "csrc/dropout_hash.h", "csrc/cpu/msplora_cpu.cpp", "csrc/cuda/msplora_kernels.cu",
                   "triton_kernels/kernels.py", "triton_kernels/launchers.py"):
        assert needed in names, needed


def test_plain_pip_install_of_the_wheel_then_the_sdist(fresh_env):
    python, tmp = fresh_env
    (wheel,) = (tmp / "dist").glob("msplora_kernels-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl")  # pure: built where torch was not importable
    proc = run([python, "-m", "pip", "install", "-q", wheel])
    assert proc.returncode == 0, proc.stderr[-3000:]
    env, stderr = report(python, tmp / "cache")
    assert "compiling the extension for torch" in stderr  # the first use builds it, saying so
    assert env["extension"]["loaded"] and env["extension"]["how"].startswith("built on first use")
    assert env["backends"]["cpp"]["available"]["cpu"]
    # The sdist, installed over it with plain pip, finds the cached build: no second compile.
    (sdist,) = (tmp / "dist").glob("msplora_kernels-*.tar.gz")
    proc = run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", sdist])
    assert proc.returncode == 0, proc.stderr[-3000:]
    env, stderr = report(python, tmp / "cache")
    assert "compiling" not in stderr and env["backends"]["cpp"]["available"]["cpu"]


def test_without_a_compiler_it_falls_back_with_one_warning(fresh_env):
    python, tmp = fresh_env
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "empty-cache"), "CXX": "/nonexistent/c++", "TRITON_INTERPRET": "0"}
    code = ("import warnings, torch\nwarnings.simplefilter('always')\nimport msplora_kernels as mk\n"
            "print(mk.available_backends('cpu'))\nprint(tuple(mk.MSPLoraLinear(8, 4)(torch.randn(2, 8)).shape))")
    proc = run([python, "-c", code], env=env, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["['torch']", "(2, 4)"]
    warnings = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warnings) == 1 and "building it on first use failed" in warnings[0]
    assert "pip install --no-build-isolation" in warnings[0] and "Traceback" not in proc.stderr


def test_an_extension_built_for_another_torch_is_not_loaded(monkeypatch):
    from msplora_kernels import _build
    from msplora_kernels.ops import native

    monkeypatch.setattr(_build, "read_build_info", lambda: {"torch": "2.0.0+cu118", "torch_cuda": "11.8"})
    how, why_not = native._load_installed()
    assert how is None
    assert why_not == f"the installed extension was built for torch 2.0.0+cu118, but torch {torch.__version__} is running"
