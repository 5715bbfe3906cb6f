"""The compiled op library msplora_kernels._C: loaded defensively, then made whole for torch.

If it cannot load, the package warns once and automatic choices fall back to the "torch"
backend; naming "cpp" or "cuda" then raises. The schemas and device kernels live in csrc/; here
they get fake kernels from the op contract (for torch.compile), their per-op derivatives, and
the settings they follow.
"""
from __future__ import annotations

import platform
import warnings

import torch

from . import contract, derivatives, settings

LOAD_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the build
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"msplora_kernels: the compiled extension could not be loaded ({LOAD_ERROR}); "
        "using the pure-PyTorch 'torch' backend. Reinstall with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

NAMESPACE = "msplora"


def loaded() -> bool:
    return LOAD_ERROR is None


def has_kernel(device_key: str) -> bool:
    """True when the compiled library registered kernels for this dispatch key ('CPU' or 'CUDA')."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::shrink", device_key)


def has_onednn() -> bool:
    """Whether this torch has oneDNN's linear op, which the cpp backend may run its products on."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")


def cpu_adapter_gemm() -> str:
    """The library that runs the cpp backend's fp32 rank-R products (csrc/cpu/rank_products.h):
    'onednn' (torch's mkldnn::_linear_pointwise; products under about a million multiply-adds stay
    on at::mm) or 'aten' (at::mm). The cpu_gemm setting: auto (oneDNN on x86-64, where it was
    measured, if torch has it), onednn (wherever torch has it) or aten."""
    mode = settings.get("cpu_gemm")
    if mode == "aten" or not has_onednn():
        return "aten"
    return "onednn" if mode == "onednn" or platform.machine().lower() in ("x86_64", "amd64") else "aten"


def op_table():
    return getattr(torch.ops, NAMESPACE)


def _push_settings(values: dict) -> None:
    # The C++ side follows resolved choices only; the rules that resolve them live here.
    ops = op_table()
    ops.set_setting("cpu_gemm", cpu_adapter_gemm())
    ops.set_setting("cuda_skinny", values["cuda_skinny"])


def _register() -> None:
    for spec in contract.OPS:
        if spec.required:
            torch.library.register_fake(f"{NAMESPACE}::{spec.name}")(
                lambda *args, _name=spec.name: contract.empty_outputs(_name, args))
    derivatives.register(NAMESPACE, contract.REQUIRED)
    settings.on_change(_push_settings)


if loaded():
    _register()
