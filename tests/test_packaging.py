"""The wheel built with torch at hand (--no-build-isolation): our Triton code only as
msplora_kernels.triton_kernels, never a top-level `triton_kernels` (that import name belongs to
another package), the compiled extension with its build record, and the C++ sources."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "MSPLORA_NO_CUDA": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("msplora_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"msplora_kernels"}, tops
    for module in ("__init__", "kernels", "launchers", "configs", "tile_table", "gemm_paths", "compile_check",
                   "tune_tiles"):
        assert f"msplora_kernels/triton_kernels/{module}.py" in names
    for module in ("models/layer", "models/inject", "ops/contract", "ops/backends", "ops/reference"):
        assert f"msplora_kernels/{module}.py" in names
    assert any(n.startswith("msplora_kernels/_C") and n.endswith(".so") for n in names)
    # Which torch the extension was built for, checked at import; the sources, for a first-use build.
    assert "msplora_kernels/_build_info.json" in names
    for source in ("msplora_ops.cpp", "settings.h", "cpu/msplora_cpu.cpp", "cuda/msplora_kernels.cu"):
        assert f"msplora_kernels/csrc/{source}" in names
    assert "msplora_kernels/analysis/__main__.py" in names


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_cpu_op_is_built_with_openmp():
    # at::parallel_for is a header template that runs serially unless the extension itself is
    # compiled with OpenMP; then the CPU dropout passes would use one core, correct but slow.
    import msplora_kernels._C as ext

    symbols = subprocess.run(["nm", "-D", ext.__file__], capture_output=True, text=True, check=True).stdout
    assert "GOMP_parallel" in symbols, f"{ext.__file__} has no OpenMP parallel region"
