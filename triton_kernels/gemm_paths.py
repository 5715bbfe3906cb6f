"""Which path runs a launch that carries a frozen GEMM (expand_linear, grad_x): the fused Triton
GEMM, or cuBLAS for the frozen GEMM with the LoRA term added into its output.

The fused path saves a pass over the output; cuBLAS may still run the big GEMM faster than a
Triton tile can. So in 'auto' mode the first launch of each (op, device, dtype, precision,
dropout, token bucket, widths, rank) times both paths once and keeps the faster for the process.
`MODE` is set by the ops layer from the `triton_gemm` setting; `choices()` lists what was chosen.
"""
from __future__ import annotations

import torch

MODES = ("auto", "fused", "cublas")
MODE = "auto"
_CHOICES: dict = {}


def _default_timer(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25)


TIMER = _default_timer  # ms of one call of fn; tests replace it


def _untimeable(like: torch.Tensor) -> bool:
    # Nothing to time while tracing (fake tensors), nor on the CPU interpreter with the real timer.
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(like):
        return True
    return like.device.type != "cuda" and TIMER is _default_timer


def choose(key: tuple, like: torch.Tensor, fused, cublas) -> str:
    """'fused' or 'cublas' for this launch; fused() and cublas() run one path each."""
    if MODE != "auto":
        return MODE
    if key in _CHOICES:
        return _CHOICES[key]["path"]
    if _untimeable(like):
        return "fused"
    fused_ms, cublas_ms = TIMER(fused), TIMER(cublas)
    path = "fused" if fused_ms <= cublas_ms else "cublas"
    _CHOICES[key] = {"path": path, "fused_ms": round(fused_ms, 4), "cublas_ms": round(cublas_ms, 4)}
    return path


def choices() -> list[dict]:
    """Every choice made so far in this process, with both timings (ms, median of the timer)."""
    names = ("op", "device", "dtype", "precision", "dropout", "m_bucket", "n", "k", "r")
    plain = lambda v: v if isinstance(v, (bool, int)) else str(v)  # noqa: E731
    return [{**dict(zip(names, map(plain, key))), **value} for key, value in _CHOICES.items()]


def forget() -> None:
    _CHOICES.clear()
