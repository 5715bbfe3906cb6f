"""What the compiled extension is made of: its sources and flags, written once for both builds.

setup.py compiles it at install time as msplora_kernels._C where torch is importable there (a
build without pip's isolation); ops/first_use_build.py compiles the same sources for the running
torch where it is not. This module imports nothing outside the standard library, so setup.py can
load it before torch is known to exist.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The installed extension's record of what it was built against, next to it.
BUILD_INFO = PACKAGE_DIR / "_build_info.json"


def csrc_dir() -> Path:
    """The C++/CUDA sources: installed inside the package, or at the top of a source tree."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if (candidate / "msplora_ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"msplora_kernels: the extension's sources are neither in {PACKAGE_DIR / 'csrc'} nor in "
                            f"{PACKAGE_DIR.parent / 'csrc'}")


def sources(root: Path, cuda: bool) -> list[str]:
    patterns = ["*.cpp", "cpu/*.cpp"] + (["cuda/*.cpp", "cuda/*.cu"] if cuda else [])
    return sorted(path for pattern in patterns for path in glob.glob(str(Path(root) / pattern)))


def wants_cuda(torch_cuda_version, cuda_home) -> bool:
    # Decided by the toolchain, not by whether a GPU happens to be present.
    return os.environ.get("MSPLORA_NO_CUDA", "0") != "1" and torch_cuda_version is not None and cuda_home is not None


def compile_args(cuda: bool) -> dict:
    opt = ["-O0", "-g"] if os.environ.get("MSPLORA_DEBUG", "0") == "1" else ["-O3"]
    args = {"cxx": opt + ["-std=c++17"]}
    if sys.platform.startswith("linux"):
        # Without _OPENMP, ATen's header-only at::parallel_for runs serially in our code (the CPU
        # dropout passes used one core). libgomp.so.1 is the runtime torch loads, so one pool.
        args["cxx"].append("-fopenmp")
    if cuda:
        args["nvcc"] = opt + ["-std=c++17", "--use_fast_math", "-lineinfo"]
    return args


def link_args() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def build_info(torch_version: str, torch_cuda_version, cuda: bool) -> dict:
    return {"torch": torch_version, "torch_cuda": torch_cuda_version, "cuda_kernels": cuda}


def write_build_info(info: dict, path: Path = BUILD_INFO) -> None:
    Path(path).write_text(json.dumps(info, indent=2) + "\n")


def read_build_info(path: Path = BUILD_INFO):
    """The installed extension's build record, or None where it was not built at install."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
