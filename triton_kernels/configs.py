"""Tile configurations: one small tile under the CPU interpreter; on a GPU, only tiles that the
launch-faithful compile check found to fit in shared memory with no register spills.

Fit depends on more than the tile: on the architecture (sm_90 has 227 KiB of shared memory a
block, sm_80 163 KiB), on the precision (an IEEE fp32 dot runs on FMAs and holds far more in
registers than a bf16 or TF32 one), on alignment (sizes and strides that are not multiples of 16
turn cp.async copies into scalar loads that live in registers across pipeline stages), on
dropout (the hash) and on the rank block. So the tiles are looked up per
(kernel, arch, precision class, aligned, dropout, rank class) in tile_table.py, which
tune_tiles.py writes: it compiles the candidates below, in order of preference, and keeps the
first that fit unspilled (up to AUTOTUNE_SIZE for the autotuned GEMMs, one for the skinny kernels).
"""
import os

import torch
import triton

from .tile_table import TILES


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The one-pass forward (shrink_expand_linear) takes R up to this: one rank block of 16, the one
# rank class the tile table checks for it. It is opt-in (the triton_forward setting) until a GPU
# run has timed it against the two kernels: recomputing T in every column tile costs N / BLOCK_N
# times the shrink's FLOPs and mask hashes, which pays only at small widths.
ONE_PASS_MAX_RANK = 16

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), most preferred first. In grad_x BLOCK_N is
# the reduction step and (BLOCK_M, BLOCK_K) the output tile.
GEMM_CANDIDATES = {
    "narrow": [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3),
               (128, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
               (128, 128, 32, 8, 3), (64, 64, 64, 4, 4), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
               (64, 64, 64, 4, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 2), (64, 64, 32, 8, 2), (32, 64, 32, 4, 2),
               (64, 32, 32, 4, 2), (32, 32, 32, 4, 2)],
    "wide": [(128, 128, 32, 8, 2), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 64, 32, 8, 3),
             (64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 3), (64, 64, 32, 4, 2),
             (64, 64, 16, 8, 2), (32, 64, 32, 4, 2), (64, 32, 32, 4, 2), (32, 32, 32, 4, 2), (32, 32, 16, 4, 2)],
}
# (BLOCK_M, BLOCK_WIDE, num_warps, num_stages) of the skinny kernels (shrink, grad_t_b, grad_a).
# Fixed, not autotuned: grad_t_b and grad_a accumulate with atomics, which autotuning re-runs
# would corrupt.
SKINNY_CANDIDATES = [(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 8, 3), (32, 64, 8, 2), (32, 64, 4, 3),
                     (32, 64, 4, 2), (32, 32, 8, 2), (32, 32, 4, 3), (32, 32, 4, 2), (16, 32, 4, 2), (16, 16, 4, 1)]
AUTOTUNE_SIZE = 6
GEMM_KERNELS = ("expand_linear", "shrink_expand_linear", "grad_x")
SKINNY_KERNELS = ("shrink", "grad_t_b", "grad_a")
# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def precision_class(dtype, allow_tf32: bool) -> str:
    """'narrow' (bf16/fp16), 'tf32', or 'ieee' (fp32 dots on FMAs)."""
    if dtype != torch.float32:
        return "narrow"
    return "tf32" if allow_tf32 else "ieee"


def rank_block(total_rank: int, dtype=None) -> int:
    """R padded to what tl.dot accepts (>= 16), one block up to 128 (64 in fp32), looped beyond."""
    return min(64 if dtype == torch.float32 else 128, max(16, triton.next_power_of_2(total_rank)))


def rank_class(block_r: int) -> str:
    # The table was compiled at a rank block of 16 and at the largest; a block between them is
    # given the largest's tiles (registers and shared memory grow with the rank block).
    return "small" if block_r <= 16 else "large"


def is_aligned(sizes, tensors) -> bool:
    """What the JIT's 16-divisibility hints need for vector loads: the widths and every stride
    above 1 multiples of 16 elements, and every base address 16-byte aligned. The address is
    judged by the storage offset (torch's allocators align every allocation to far more than 16
    bytes), which a fake tensor under torch.compile has too, unlike a data pointer."""
    return all(s % 16 == 0 for s in sizes) and all(
        t.storage_offset() * t.element_size() % 16 == 0 and all(st % 16 == 0 for st in t.stride() if st != 1)
        for t in tensors)


def table_arch(arch: int) -> int:
    """The architecture whose table serves `arch`: sm_90's from Hopper on, sm_80's below."""
    return 90 if arch >= 90 else 80


def _shared_estimate(tile, kernel: str, itemsize: int) -> int:
    # The pipelined main loop's buffers: num_stages copies of one A tile and one B tile.
    m, n, k, _, stages = tile
    step, width = (n, k) if kernel == "grad_x" else (k, n)
    return stages * (m * step + step * width) * itemsize


def gemm_tiles(kernel: str, arch: int, cls: str, aligned: bool, dropout: bool, block_r: int) -> list[tuple]:
    """The autotune space of a GEMM launch. An arch without its own table (sm_86, sm_89, sm_120)
    gets its family's, less the tiles whose buffers exceed its shared memory."""
    if interpreting():
        return [(32, 32, 32, 4, 1)]
    key = (kernel, table_arch(arch), cls, aligned, dropout, rank_class(block_r))
    tiles = TILES.get(key) or [GEMM_CANDIDATES["wide"][-1]]  # unseen key: the smallest tile
    if arch not in (80, 90):
        limit = SHARED_LIMIT.get(arch, 99 * 1024)
        itemsize = 2 if cls == "narrow" else 4
        tiles = [t for t in tiles if _shared_estimate(t, kernel, itemsize) <= limit] or [tiles[-1]]
    return tiles


def skinny_tile(kernel: str, arch: int, cls: str, aligned: bool, dropout: bool, block_r: int) -> tuple:
    """(BLOCK_M, BLOCK_WIDE, num_warps, num_stages) of a skinny kernel's launch."""
    if interpreting():
        return 32, 32, 4, 1
    key = (kernel, table_arch(arch), cls, aligned, dropout, rank_class(block_r))
    return (TILES.get(key) or [SKINNY_CANDIDATES[-1]])[0]


def gemm_configs(tiles) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]
