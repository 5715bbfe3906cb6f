"""The compiled op library: loaded defensively, then made whole for torch.

Where it comes from, in order: msplora_kernels._C built at install time, if it was built for the
running torch (msplora_kernels/_build_info.json says which); else a build for the running torch
on first use (first_use_build.py), cached; else nothing, and the package warns once and
automatic choices fall back to the "torch" backend (naming "cpp" or "cuda" then raises). The
schemas and device kernels live in csrc/; here they get fake kernels from the op contract (for
torch.compile), their per-op derivatives, and the settings they follow.
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from .. import _build
from .._version import __version__
from . import contract, cpu_info, derivatives, first_use_build, settings

FIX = ("pip install --no-build-isolation --force-reinstall msplora-kernels (with torch, a C++ compiler and ninja "
       "installed), or from a source tree: pip install --no-build-isolation -e .")


def _load_installed():
    """Import the extension built at install; returns (how it loaded, or None, and why not)."""
    info = _build.read_build_info()
    if info is None:
        return None, "no extension was built at install time"
    if info.get("torch") != torch.__version__:
        return None, (f"the installed extension was built for torch {info.get('torch')}, but torch "
                      f"{torch.__version__} is running")
    try:
        from .. import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the build
        return None, f"the installed extension did not load ({type(exc).__name__}: {exc})"
    return f"built at install for torch {info['torch']}", None


def _load():
    how, why_not_installed = _load_installed()
    if how is not None:
        return how, None
    if not first_use_build.enabled():
        return None, f"{why_not_installed}, and the first-use build is off (MSPLORA_FIRST_USE_BUILD=0)"
    try:
        folder = first_use_build.load()
    except Exception as exc:  # a compiler error, a missing compiler or ninja: fall back, saying why
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        return None, f"{why_not_installed}, and building it on first use failed ({type(exc).__name__}: {detail})"
    return f"built on first use for torch {torch.__version__}, in {folder}", None


HOW_LOADED, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"msplora_kernels: the compiled extension is not available: {LOAD_ERROR}. Using the pure-PyTorch "
                  f"'torch' backend. To fix: {FIX}", RuntimeWarning, stacklevel=2)

NAMESPACE = "msplora"


def loaded() -> bool:
    return LOAD_ERROR is None


def has_kernel(device_key: str) -> bool:
    """True when the compiled library registered kernels for this dispatch key ('CPU' or 'CUDA')."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::shrink", device_key)


def has_onednn() -> bool:
    """Whether this torch has oneDNN's linear op, which the cpp backend may run its products on."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")


def gemm_choices() -> list[str]:
    """The GEMM library (and orientation) the cpp backend chose for each GEMM and shape class so
    far, with what it measured (csrc/cpu/gemms.h): one line each."""
    return op_table().gemm_choices().splitlines() if has_kernel("CPU") else []


def op_table():
    return getattr(torch.ops, NAMESPACE)


def gemm_choice_file() -> Optional[Path]:
    """The file that keeps the cpp backend's timed GEMM choices for every process on this machine
    (the cpu_gemm_store setting at "disk"), or None (at "process", or where the folder cannot be
    made): one per CPU model and instruction sets, torch version and package version."""
    path = op_table().gemm_choice_file() if has_kernel("CPU") else ""
    return Path(path) if path else None


@functools.lru_cache(maxsize=None)
def _choice_file_for_this_machine() -> str:
    # Keyed by what changes which candidate is fastest: the CPU, torch's libraries and our kernels
    # (the sources' digest: a development build of the same version may time differently).
    info = cpu_info.cpu_info()
    try:
        kernels = first_use_build.sources_digest(_build.sources(_build.csrc_dir(), cuda=False))
    except FileNotFoundError:
        kernels = "nosource"
    name = "-".join([cpu_info.cpu_label(info), *info["isa"], f"torch{torch.__version__}", f"msplora{__version__}",
                     kernels])
    folder = first_use_build.cache_root() / "gemm-choices"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return ""  # timed in each process, as at cpu_gemm_store="process"
    return str(folder / (re.sub(r"[^A-Za-z0-9.+_-]+", "_", name) + ".tsv"))


def _push_settings(values: dict) -> None:
    ops = op_table()
    ops.set_setting("cpu_gemm", values["cpu_gemm"])
    ops.set_setting("cuda_skinny", values["cuda_skinny"])
    if has_kernel("CPU"):
        ops.set_gemm_choice_file(_choice_file_for_this_machine() if values["cpu_gemm_store"] == "disk" else "")


def provided() -> list[str]:
    """The contract's ops that the compiled library declares: every required one, and the optional
    ones some device's kernels provide (csrc/msplora_ops.cpp)."""
    return [spec.name for spec in contract.OPS if hasattr(op_table(), spec.name)]


def _register() -> None:
    for name in provided():
        torch.library.register_fake(f"{NAMESPACE}::{name}")(lambda *args, _name=name: contract.empty_outputs(_name, args))
    derivatives.register(NAMESPACE, provided())
    settings.on_change(_push_settings)


if loaded():
    _register()
