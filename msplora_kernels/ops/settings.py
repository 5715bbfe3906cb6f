"""Process-wide choices, visible and settable from Python.

Each setting starts from its environment variable, read once when the package is imported (or
when `from_environment()` is called); after that only `configure()` changes it. Nothing reads
the environment per call. `msplora_kernels.backend_info()` shows every setting and what it
resolved to.

    backend         $MSPLORA_BACKEND         the backend of calls that name none (None: the best available)
    cpu_gemm        $MSPLORA_CPU_GEMM        the cpp backend's GEMM libraries: auto (timed per shape class),
                                             aten or onednn (orientation timed), one fixed
                                             library:orientation (aten:plain, ..., onednn:transposed),
                                             or fused (our kernels where one applies: the products
                                             that write an (M, N) tensor with the mask and bias, and
                                             in bf16 at a total rank up to 16 the shrink and dT with
                                             dB in one pass; ATen elsewhere)
    cpu_gemm_store  $MSPLORA_CPU_GEMM_STORE  where the cpp backend keeps the GEMM choices it times: disk (a
                                             file per CPU model, torch and package version, under
                                             the cache folder: every process on this machine picks
                                             alike, so runs give the same bits) or process (timed
                                             anew in each process)
    cuda_skinny     $MSPLORA_CUDA_SKINNY     the cuda backend's rank-R products: auto, kernels or cublas
    triton_forward  $MSPLORA_TRITON_FORWARD  the triton backend's forward: split (two kernels) or onepass
    triton_gemm     $MSPLORA_TRITON_GEMM     the triton backend's frozen GEMMs: auto (both paths timed once
                                             per shape bucket, the faster kept), fused (in the Triton
                                             kernels) or cublas (cuBLAS, the LoRA term added by Triton)
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

CHOICES = {
    "backend": (None, "torch", "cpp", "cuda", "triton"),
    "cpu_gemm": ("auto", "aten", "onednn", "aten:plain", "aten:transposed", "onednn:plain", "onednn:transposed",
                 "fused"),
    "cpu_gemm_store": ("disk", "process"),
    "cuda_skinny": ("auto", "kernels", "cublas"),
    "triton_forward": ("split", "onepass"),
    "triton_gemm": ("auto", "fused", "cublas"),
}
ENVIRONMENT = {name: f"MSPLORA_{name.upper()}" for name in CHOICES}

_values: dict = {name: choices[0] for name, choices in CHOICES.items()}
_sources: dict = {name: "default" for name in CHOICES}
_listeners: list[Callable[[dict], None]] = []


def get(name: str):
    return _values[name]


def source(name: str) -> str:
    """Where the current value came from: 'default', '$MSPLORA_...' or 'configure()'."""
    return _sources[name]


def current() -> dict:
    return dict(_values)


def on_change(listener: Callable[[dict], None]) -> None:
    """Call listener(settings) now and after every change (the compiled extension mirrors some)."""
    _listeners.append(listener)
    listener(current())


def _checked(changes: dict, origin: str) -> dict:
    for name, value in changes.items():
        if name not in CHOICES:
            raise ValueError(f"msplora: unknown setting {name!r}; settings are {sorted(CHOICES)}")
        if value not in CHOICES[name]:
            raise ValueError(f"msplora: {origin} sets {name}={value!r}; choose one of {list(CHOICES[name])}")
    return changes


def _apply(changes: dict, origin: str) -> dict:
    previous = {name: (_values[name], _sources[name]) for name in changes}
    _values.update(changes)
    _sources.update({name: origin for name in changes})
    for listener in _listeners:
        listener(current())
    return previous


def configure(**changes) -> dict:
    """Set one or more settings for this process, e.g. configure(cpu_gemm="aten"); returns the
    previous values. Every value is checked before any is set."""
    previous = _apply(_checked(changes, "configure()"), "configure()")
    return {name: value for name, (value, _) in previous.items()}


@contextlib.contextmanager
def overridden(**changes):
    """Settings changed within a block only."""
    previous = _apply(_checked(changes, "overridden()"), "configure()")
    try:
        yield
    finally:
        for name, (value, origin) in previous.items():
            _apply({name: value}, origin)


def from_environment() -> None:
    """(Re)read every $MSPLORA_* variable; an unset or empty one leaves its setting as it is."""
    for name, var in ENVIRONMENT.items():
        raw = os.environ.get(var)
        if raw:
            _apply(_checked({name: raw}, f"${var}"), f"${var}")


from_environment()
