"""Loads the compiled op library msplora_kernels._C, defensively.

If it cannot load, the package warns once and every call falls back to the
"torch" backend; naming "cpp" or "cuda" explicitly then raises.
"""
from __future__ import annotations

import warnings

import torch

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except (ImportError, OSError) as exc:  # pragma: no cover - depends on the build
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"msplora_kernels: the compiled extension could not be loaded ({LOAD_ERROR}); "
        "using the pure-PyTorch 'torch' backend. Reinstall with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return LOAD_ERROR is None


def has_kernel(device_type: str) -> bool:
    """True when the compiled library registered kernels for this dispatch key ('CPU' or 'CUDA')."""
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("msplora::shrink", device_type)
