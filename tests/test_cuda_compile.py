"""Compile checks of the CUDA backend on a machine without a GPU.

1. Every kernel .cu compiles with plain nvcc for sm_80 and sm_90, with no register spills.
2. The torch-side launcher type-checks against torch's own ATen/c10 CUDA headers (which the
   CPU wheel ships); only the cuBLAS/cuSPARSE/cuSOLVER handle typedefs they mention are stubbed.
"""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
SPILL = re.compile(r"(\d+) bytes spill (stores|loads)")


def test_there_are_kernels():
    assert KERNELS, "no .cu files in csrc/cuda"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_kernel_compiles_without_spills(source, arch, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
           str(source), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for {arch}:\n{proc.stderr[-4000:]}"
    report = proc.stdout + proc.stderr
    assert "bytes spill" in report, "ptxas -v printed no resource report"
    spills = [line for line in report.splitlines() if any(int(n) > 0 for n, _ in SPILL.findall(line))]
    assert not spills, f"register spills on {arch}:\n" + "\n".join(spills)


def _cuda_include():
    for base in filter(None, [os.environ.get("CUDA_HOME"), "/usr/local/cuda", NVCC and str(Path(NVCC).resolve().parents[1])]):
        if (Path(base) / "include" / "cuda_runtime.h").exists():
            return Path(base) / "include"
    return None


STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
    "cusolverDn.h": '#include "cusolver_common.h"\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n',
    "c10/cuda/impl/cuda_cmake_macros.h": "",
}


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and the CUDA runtime headers")
@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cpp")), ids=lambda p: p.name)
def test_launcher_typechecks_against_torch_headers(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    for name, text in STUBS.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#pragma once\n" + text)
    cmd = ["g++", "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in include_paths()],
           f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path}", f"-I{_cuda_include()}", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
