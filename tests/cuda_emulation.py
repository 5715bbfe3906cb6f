"""Builds csrc/cuda for the CPU against the stand-in CUDA headers in tests/cuda_emulator/.

g++ cannot parse `kernel<<<grid, block, smem, stream>>>(args)`, so the kernels' source is
rewritten into `::emu::launch(kernel, grid, block, smem, stream, args)`; the launchers' device
registration, and the settings ops they follow (csrc/settings.cpp), are rewritten into a namespace
of their own, so that they run on CPU tensors next to the cpp backend's registration of the same
ops, with settings of their own.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from msplora_kernels import available_backends

ROOT = Path(__file__).resolve().parents[1]
EMULATOR = ROOT / "tests" / "cuda_emulator"
KERNELS = ROOT / "csrc" / "cuda" / "msplora_kernels.cu"
LAUNCHERS = ROOT / "csrc" / "cuda" / "msplora_cuda.cpp"
SETTINGS = ROOT / "csrc" / "settings.cpp"
INCLUDES = [EMULATOR, KERNELS.parent, ROOT / "csrc"]  # the stand-ins first
NAMESPACE = "msplora_emulated_cuda"
_LAUNCH = re.compile(r"(\w+<T>)<<<(.+?)>>>\(")
_REGISTRATION = "TORCH_LIBRARY_IMPL(msplora, CUDA, m)"


def gxx_major() -> int:
    if shutil.which("g++") is None:
        return 0
    out = subprocess.run(["g++", "-dumpfullversion"], capture_output=True, text=True).stdout
    return int(out.split(".")[0] or 0)


def requirements():
    """The skip marks of a test module that builds with g++ and compares with the cpp backend."""
    return [
        pytest.mark.skipif(gxx_major() < 12, reason="needs g++ 12 or newer (_Float16 stands in for __half)"),
        pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="compares with the cpp backend"),
    ]


def kernels_as_cpp(out_dir: Path) -> Path:
    source = KERNELS.read_text()
    rewritten, launches = _LAUNCH.subn(r"::emu::launch(\1, \2, ", source)
    assert launches == source.count("<<<") > 0, "a kernel launch that the rewrite does not recognize"
    path = out_dir / "msplora_kernels_emulated.cpp"
    path.write_text(rewritten)
    return path


def launchers_as_cpp(out_dir: Path) -> Path:
    source = LAUNCHERS.read_text()
    assert source.count(_REGISTRATION) == 1, f"expected one {_REGISTRATION} in {LAUNCHERS.name}"
    rewritten = source.replace(_REGISTRATION, f"TORCH_LIBRARY({NAMESPACE}, m)").replace("m.impl(", "m.def(")
    path = out_dir / "msplora_cuda_emulated.cpp"
    path.write_text(rewritten)
    return path


def settings_as_cpp(out_dir: Path) -> Path:
    source = SETTINGS.read_text()
    fragment = "TORCH_LIBRARY_FRAGMENT(msplora, m)"
    assert source.count(fragment) == 1, f"expected one {fragment} in {SETTINGS.name}"
    path = out_dir / "settings_emulated.cpp"
    path.write_text(source.replace(fragment, f"TORCH_LIBRARY_FRAGMENT({NAMESPACE}, m)"))
    return path


def build_launchers(out_dir: Path):
    """Compile the launchers with the emulated kernels and their settings ops; returns their op
    table, torch.ops.msplora_emulated_cuda."""
    import torch
    from torch.utils.cpp_extension import load

    sources = [kernels_as_cpp(out_dir), launchers_as_cpp(out_dir), settings_as_cpp(out_dir)]
    load(name=NAMESPACE, sources=[str(s) for s in sources], extra_include_paths=[str(p) for p in INCLUDES],
         extra_cflags=["-O1", "-Wno-unknown-pragmas"], build_directory=str(out_dir), is_python_module=False,
         verbose=False)
    return getattr(torch.ops, NAMESPACE)
