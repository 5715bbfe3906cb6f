"""The backends: typed records of what each implementation runs on and can do, and the choice.

A backend is an op table that follows the op contract (contract.py) plus its capabilities; the
autograd Function (autograd.py) composes any of them and reads capabilities, never names. A
backend chosen automatically may quietly fall back to the next; one that the user names (an
argument or the `backend` setting) either runs or raises, saying why not.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import torch

from .._extras import install_hint
from . import contract, native, settings


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    device_types: tuple  # where it can run
    dtypes: Optional[tuple]  # the dtypes it computes in; None: every floating dtype
    load_ops: Callable[[], object]  # the op table; raises where it cannot load
    why_not: Callable[[str], list]  # reasons it cannot run on a device type; empty when it can
    # Capabilities.
    keeps_dropped_input: bool = False  # the forward keeps dropout(x) for dA instead of regenerating the mask
    # The forward keeps the mask packed (shrink_keep_mask) for dx and dA; with keeps_dropped_input,
    # for dx only (dropout_keep_mask draws both in one pass).
    keeps_mask_bits: bool = False
    one_pass_forward: Callable[[int], bool] = lambda total_rank: False  # shrink_expand_linear for this rank
    gemm_library: Callable[[], str] = lambda: "ATen"  # who runs its GEMMs, in words

    def supports(self, dtype) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes

    @property
    def ops(self):
        return _op_table(self.name)

    def available(self, device_type: str) -> bool:
        return not self.why_not(device_type)


def _torch_ops():
    from . import reference

    return reference


def _native_ops():
    if not native.loaded():
        raise RuntimeError(f"the compiled extension did not load: {native.LOAD_ERROR}")
    return native.op_table()


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return f"triton is not installed ({install_hint('triton')})"
    try:
        from . import triton_ops  # noqa: F401
    except Exception as exc:  # any failure means the backend is not usable
        return f"triton: {type(exc).__name__}: {exc}"
    return None


def _triton_ops():
    error = _triton_import_error()
    if error is not None:
        raise RuntimeError(error)
    from . import triton_ops

    return triton_ops.op_table()


def triton_interpreter_on() -> bool:
    # Triton's own variable: it must be set before the kernels are first imported.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _native_why_not(key: str, device: str) -> Callable[[str], list]:
    def why_not(device_type):
        if device_type != device:
            return [f"runs on {device} tensors only"]
        if not native.loaded():
            return [f"the compiled extension did not load ({native.LOAD_ERROR})"]
        if not native.has_kernel(key):
            return [f"the compiled extension was built without {key} kernels"]
        return []

    return why_not


def _triton_why_not(device_type) -> list:
    reasons = []
    if device_type not in ("cuda", "cpu"):
        reasons.append("runs on cuda tensors (and on cpu ones under TRITON_INTERPRET=1)")
    elif device_type == "cpu" and not triton_interpreter_on():
        reasons.append("on the CPU, triton runs only under TRITON_INTERPRET=1")
    if _triton_import_error() is not None:
        reasons.append(_triton_import_error())
    return reasons


def _triton_one_pass(total_rank: int) -> bool:
    if settings.get("triton_forward") != "onepass" or _triton_import_error() is not None:
        return False
    from ..triton_kernels.configs import ONE_PASS_MAX_RANK

    return total_rank <= ONE_PASS_MAX_RANK


def triton_gemm_choices() -> list[dict]:
    """What the triton backend chose per shape bucket in auto mode, with both paths' timings (ms)."""
    if _triton_import_error() is not None:
        return []
    from . import triton_ops

    return triton_ops.gemm_path_choices()


def cuda_skinny_library() -> str:
    """Who runs the cuda backend's rank-R products: our kernels up to a total rank of 64 and cuBLAS
    beyond ('auto'), or always one of them (the `cuda_skinny` setting)."""
    return {"auto": "ours up to R = 64, cuBLAS beyond", "kernels": "ours", "cublas": "cuBLAS"}[
        settings.get("cuda_skinny")]


def _choices_kept_where() -> str:
    path = native.gemm_choice_file() if native.loaded() else None
    return f"the timed choices kept for this machine in {path}" if path else "the timed choices kept in this process only"


BACKENDS = {
    b.name: b
    for b in (
        Backend("torch", "the reference in plain PyTorch (reference.py), on any device", ("cpu", "cuda", "meta", "mps"),
                None, _torch_ops, lambda device_type: []),
        Backend("cpp", "the compiled CPU op (csrc/cpu)", ("cpu",), None, _native_ops, _native_why_not("CPU", "cpu"),
                keeps_dropped_input=True, keeps_mask_bits=True,
                gemm_library=lambda: f"ATen, oneDNN or our kernels per GEMM and shape class (cpu_gemm={settings.get('cpu_gemm')}); "
                                     f"{len(native.gemm_choices())} chosen so far; {_choices_kept_where()}"),
        Backend("cuda", "the compiled CUDA op (csrc/cuda)", ("cuda",), contract.GPU_DTYPES, _native_ops,
                _native_why_not("CUDA", "cuda"),
                gemm_library=lambda: f"frozen GEMMs on cuBLAS, rank-R products: {cuda_skinny_library()}"),
        Backend("triton", "the Triton kernels (triton_kernels/)", ("cuda", "cpu"), contract.GPU_DTYPES, _triton_ops,
                _triton_why_not, one_pass_forward=_triton_one_pass, keeps_mask_bits=True,
                gemm_library=lambda: f"frozen GEMMs fused in Triton or on cuBLAS (triton_gemm="
                                     f"{settings.get('triton_gemm')}; {len(triton_gemm_choices())} chosen so far), "
                                     f"rank-R products in Triton, forward {settings.get('triton_forward')}"),
    )
}
# The automatic choice's order on each device, best first.
PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch", "triton")}
_OP_TABLES: dict = {}


def _op_table(name: str):
    # Filled on first use, outside any compiled region, so that compiled code only reads a dict.
    if name not in _OP_TABLES:
        _OP_TABLES[name] = BACKENDS[name].load_ops()
    return _OP_TABLES[name]


@functools.lru_cache(maxsize=None)
def _available(device_type: str, interpreter: bool) -> tuple:
    # Cached: this runs on every call, and availability is fixed once the extension has loaded.
    del interpreter  # part of the cache key only
    order = PREFERENCE.get(device_type, ("torch",))
    return tuple(name for name in order if BACKENDS[name].available(device_type))


# Backend choice is fixed for a traced graph: torch.compile evaluates these at trace time.
@torch.compiler.assume_constant_result
def available_backends(device="cpu") -> list[str]:
    """Backends usable for tensors on `device`, best first."""
    return list(_available(torch.device(device).type, triton_interpreter_on()))


@torch.compiler.assume_constant_result
def resolve_backend(backend: Optional[str], device, dtype=None) -> str:
    """The backend to run: the argument, else the `backend` setting, else the best available for dtype."""
    requested, source = backend, "backend="
    if requested is None and settings.get("backend") is not None:
        requested = settings.get("backend")
        origin = settings.source("backend")
        source = f"{origin}=" if origin.startswith("$") else "the backend setting "
    device = torch.device(device)
    available = _available(device.type, triton_interpreter_on())
    if requested is None:
        return next(name for name in available if BACKENDS[name].supports(dtype))
    if requested not in BACKENDS:
        raise ValueError(f"msplora: unknown backend {source}{requested!r}; choose one of {list(BACKENDS)}")
    if requested not in available:
        reasons = BACKENDS[requested].why_not(device.type)
        raise RuntimeError(
            f"msplora: backend {source}{requested!r} is not available for device {device} ({'; '.join(reasons)}); "
            f"available: {list(available)}"
        )
    if not BACKENDS[requested].supports(dtype):
        raise TypeError(
            f"msplora: backend {source}{requested!r} computes in "
            f"{[str(d) for d in BACKENDS[requested].dtypes]}, got {dtype}; choose another backend"
        )
    return requested


def backend_info() -> dict:
    """Every backend with where it runs, whether it is available here (and why not), its
    capabilities and GEMM libraries, and every setting with its source: what a bug report needs."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {"settings": {name: {"value": settings.get(name), "source": settings.source(name)}
                        for name in settings.CHOICES},
           "extension": {"loaded": native.loaded(), "how": native.HOW_LOADED, "why_not": native.LOAD_ERROR},
           "backends": {}}
    for name, b in BACKENDS.items():
        out["backends"][name] = {
            "summary": b.summary,
            "dtypes": "every floating dtype" if b.dtypes is None else [str(d) for d in b.dtypes],
            "available": {d: not b.why_not(d) for d in devices},
            "why_not": {d: b.why_not(d) for d in devices if b.why_not(d)},
            "keeps_dropped_input": b.keeps_dropped_input,
            "keeps_mask_bits": b.keeps_mask_bits,
            "one_pass_forward": b.one_pass_forward(1),
            "gemm_library": b.gemm_library(),
        }
    return out
