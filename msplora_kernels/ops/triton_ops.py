"""The Triton launchers (triton_kernels/launchers.py) as torch.library ops, msplora_triton::<name>.

Registered with triton_op, so that torch.compile(fullgraph=True) traces into their kernels; each
call is first checked against the op contract, so a direct call with bad shapes gets a clear
error. Importing this module needs triton.
"""
from __future__ import annotations

import functools

import torch
from torch.library import triton_op

from ..triton_kernels import gemm_paths, launchers
from . import contract, derivatives, settings

NAMESPACE = "msplora_triton"
DTYPES = contract.GPU_DTYPES


def _checked(name: str, launch):
    # functools.wraps: torch infers the op's schema from the launcher's signature, and finds the
    # kernels it launches in the launcher's source.
    @functools.wraps(launch)
    def op(*args):
        contract.bind(name, args)
        dtype = next(a for a in args if isinstance(a, torch.Tensor)).dtype
        if dtype not in DTYPES:
            raise TypeError(f"msplora triton backend: {name} computes in {[str(d) for d in DTYPES]}, got {dtype}")
        return launch(*args)

    return op


# Every op of the contract that has a launcher: the required ones and the optional ones that the
# triton backend's capabilities use.
PROVIDED = [spec.name for spec in contract.OPS if hasattr(launchers, spec.name)]
for _name in PROVIDED:
    triton_op(f"{NAMESPACE}::{_name}", _checked(_name, getattr(launchers, _name)), mutates_args=())
derivatives.register(NAMESPACE, PROVIDED)


def _follow_settings(values: dict) -> None:
    gemm_paths.MODE = values["triton_gemm"]


settings.on_change(_follow_settings)


def op_table():
    return getattr(torch.ops, NAMESPACE)


def gemm_path_choices() -> list[dict]:
    """The triton backend's frozen-GEMM path per shape bucket, with both timings (gemm_paths.py)."""
    return gemm_paths.choices()
