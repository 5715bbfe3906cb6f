"""Which implementation runs: discovery, preference order and explicit choice.

A backend chosen automatically may quietly fall back; a backend the user names
(argument or MSPLORA_BACKEND) either runs or raises.
"""
from __future__ import annotations

import functools
import os
import platform

import torch

from . import _native

ALL_BACKENDS = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "MSPLORA_BACKEND"
# Dtypes a backend computes in; backends not listed take every float dtype.
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKEND_DTYPES = {"triton": _GPU_DTYPES, "cuda": _GPU_DTYPES}


def supports_dtype(name: str, dtype) -> bool:
    return dtype is None or dtype in BACKEND_DTYPES.get(name, (dtype,))


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401

        from .triton_kernels import ops  # noqa: F401
    except Exception as exc:  # any failure means the backend is not usable
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _available(device_type: str, interpreter: bool) -> tuple:
    # Cached: the compiled kernels and triton are loaded once, and this runs on every call.
    if device_type == "cuda":
        names = []
        if _triton_import_error() is None:
            names.append("triton")
        if _native.has_kernel("CUDA"):
            names.append("cuda")
        return (*names, "torch")
    if device_type == "cpu":
        names = ["cpp"] if _native.has_kernel("CPU") else []
        names.append("torch")
        # The interpreter is for testing the kernels on the CPU, never the fast path.
        if interpreter and _triton_import_error() is None:
            names.append("triton")
        return tuple(names)
    return ("torch",)


# Backend choice is fixed for a traced graph: torch.compile evaluates these at trace time.
@torch.compiler.assume_constant_result
def available_backends(device="cpu") -> list[str]:
    """Backends usable for tensors on `device`, best first."""
    return list(_available(torch.device(device).type, triton_interpreter_on()))


@torch.compiler.assume_constant_result
def resolve_backend(backend: str | None, device, dtype=None) -> str:
    """The backend to run: the argument, else $MSPLORA_BACKEND, else the best available for dtype."""
    requested, source = backend, "backend="
    if requested is None and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], f"${ENV_VAR}="
    device = torch.device(device)
    available = _available(device.type, triton_interpreter_on())
    if requested is None:
        return next(name for name in available if supports_dtype(name, dtype))
    if requested not in ALL_BACKENDS:
        raise ValueError(f"msplora: unknown backend {source}{requested!r}; choose one of {list(ALL_BACKENDS)}")
    if requested not in available:
        why = ""
        if requested in ("cpp", "cuda") and not _native.loaded():
            why = f" (the compiled extension did not load: {_native.LOAD_ERROR})"
        elif requested == "triton" and _triton_import_error() is not None:
            why = f" (triton: {_triton_import_error()})"
        elif requested == "triton" and device.type == "cpu":
            why = " (on the CPU, triton runs only under TRITON_INTERPRET=1)"
        raise RuntimeError(
            f"msplora: backend {source}{requested!r} is not available for device {device}{why}; "
            f"available: {list(available)}"
        )
    if not supports_dtype(requested, dtype):
        raise TypeError(
            f"msplora: backend {source}{requested!r} computes in "
            f"{[str(d) for d in BACKEND_DTYPES[requested]]}, got {dtype}; choose another backend"
        )
    return requested


def fused_op_table(name: str):
    """The op table of a fused backend: shrink, expand_linear, grad_t_b, grad_x, grad_a, dropout_mask."""
    if name in ("cpp", "cuda"):
        from .native_ops import op_table

        return op_table()
    if name == "triton":
        from .triton_kernels import ops

        return ops
    raise ValueError(f"msplora: {name!r} is not a fused backend")


CPU_GEMM_ENV = "MSPLORA_CPU_GEMM"


def cpu_adapter_gemm() -> str:
    """The library that runs the cpp backend's fp32 rank-R products (csrc/cpu/rank_products.h):
    'onednn' (torch's mkldnn::_linear_pointwise, on x86-64 where torch has it; products under about a
    million multiply-adds stay on at::mm) or 'aten' (at::mm); $MSPLORA_CPU_GEMM=aten forces the latter."""
    mode = os.environ.get(CPU_GEMM_ENV) or "auto"
    if mode not in ("auto", "aten"):
        raise ValueError(f"msplora: ${CPU_GEMM_ENV}={mode!r}; choose 'auto' (oneDNN where torch has it) or 'aten'")
    has_onednn = torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")
    x86 = platform.machine().lower() in ("x86_64", "amd64")  # where it was measured (rank_products.h)
    return "onednn" if mode == "auto" and has_onednn and x86 else "aten"

