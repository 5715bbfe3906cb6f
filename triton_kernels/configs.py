"""Tile configurations: one small tile under the CPU interpreter, Hopper-sized tiles on a GPU.

fp32 tiles take twice the shared memory of bf16 ones, and Hopper gives a block at most 227 KiB, so
fp32 gets smaller tiles and rank blocks (checked for every configuration by compile_check.py).
"""
import os

import torch
import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _wide(dtype) -> bool:
    return dtype == torch.float32


# The one-pass forward (shrink_expand_linear) takes R up to this, one small rank block. It is
# opt-in (the triton_forward setting) until a GPU run has timed it against the two kernels:
# recomputing T in every column tile costs N / BLOCK_N times the shrink's FLOPs and mask hashes,
# which pays only where the saved launch and round trip of T matter (small widths).
ONE_PASS_MAX_RANK = 32


def rank_block(total_rank: int, dtype=None) -> int:
    """R padded to what tl.dot accepts (>= 16), one block up to 128 (64 in fp32), looped beyond."""
    return min(64 if _wide(dtype) else 128, max(16, triton.next_power_of_2(total_rank)))


def gemm_configs(dtype=None):
    """Autotune space of the two big fused GEMMs (K2, K4) on H100/H200."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    if _wide(dtype):
        shapes = [
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (64, 64, 32, 4, 3),
            (128, 128, 32, 8, 2),
        ]
    else:
        shapes = [
            (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def skinny_tiles(dtype=None):
    """(BLOCK_M, BLOCK_WIDE, num_warps, num_stages) of the memory-bound skinny kernels (K1, K3, dA).

    Fixed, not autotuned: K3 and dA accumulate with atomics, which autotuning re-runs would corrupt.
    Chosen from ptxas's register reports on sm_90 (compile_check --registers), not yet timed: with
    4 warps, 64x128 tiles spilled up to 4 KiB per thread (Philox dropout and the dB tile), while
    64x64 with 8 warps spills nothing in shrink and dA, in every dtype.
    """
    if interpreting():
        return 32, 32, 4, 1
    return 64, 64, 8, 3
