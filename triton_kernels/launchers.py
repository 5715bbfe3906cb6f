"""Launchers of the Triton kernels: each allocates its outputs and launches, nothing more.

Names and semantics are the op contract's (msplora_kernels/ops/contract.py); the ops layer
checks arguments and registers these as torch.library ops (msplora_kernels/ops/triton_ops.py).
Kernels are launched through wrap_triton so that torch.compile can trace them. This package
imports torch and triton only.
"""
from __future__ import annotations

import torch
import triton
from torch.library import wrap_triton

from . import gemm_paths, kernels
from .configs import (ONE_PASS_MAX_RANK, gemm_configs, gemm_tiles, is_aligned, precision_class, rank_block,
                      skinny_tile)

_AUTOTUNERS = {}


def _autotuned(kernel, tiles, restore=()):
    """One autotuner per kernel and tile list (configs.py picks the list per launch). It tunes
    once per power-of-two bucket of the token count (M_BUCKET), not per M: a new batch shape in
    the same bucket reuses the choice."""
    key = (kernel, tuple(tiles), restore)
    if key not in _AUTOTUNERS:
        _AUTOTUNERS[key] = triton.autotune(gemm_configs(tiles), key=["M_BUCKET", "N", "K", "R"],
                                           restore_value=list(restore) or None)(kernel)
    return _AUTOTUNERS[key]


def m_bucket(m: int) -> int:
    """The power of two at or above m (at least 16), the autotune key's token count."""
    return max(16, triton.next_power_of_2(m))


def target_arch(device) -> int:
    """Compute capability x 10 of the device the launch runs on (compile_check replaces this);
    0 for the CPU tensors of the interpreter, which has one tile for all."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tiling(name, big, sizes, tensors, p, block_r):
    # The tile table's key for this launch: see configs.py.
    return (name, target_arch(big.device), precision_class(big.dtype, torch.backends.cuda.matmul.allow_tf32),
            is_aligned(sizes, tensors), p > 0, block_r)


def _keep_scale(p: float) -> float:
    return 1.0 / (1.0 - p)


def _dot_precision() -> str:
    # Follow torch: fp32 matmuls use TF32 only where the user allowed it.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _seed_arg(p: float, seed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Without dropout the kernel never reads the seed, but Triton's launcher still
    # rejects the null pointer of an empty tensor; any valid pointer will do.
    return seed if p > 0 and seed is not None else like


def shrink(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return _shrink(x, a, p, seed, None)


def shrink_keep_mask(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, the mask packed 32 to an int32 word): the backward reads it instead of hashing again."""
    M, K = x.shape
    bits = torch.empty((M, _words(K)), device=x.device, dtype=torch.int32)
    if p == 0:  # every element kept; no kernel draws anything
        bits.fill_(-1)
        if K % 32:
            bits[:, -1] = (1 << (K % 32)) - 1
        return _shrink(x, a, p, seed, None), bits
    return _shrink(x, a, p, seed, bits), bits


def _words(k: int) -> int:
    return triton.cdiv(k, 32)


def _shrink(x, a, p, seed, bits):
    M, K = x.shape
    R = a.shape[1]
    t = x.new_empty((M, R))
    if M == 0:
        return t
    block_r = rank_block(R, x.dtype)
    block_m, block_k, warps, stages = skinny_tile(*_tiling("shrink", x, (K,), (x,), p, block_r))
    if bits is not None:
        block_k = max(block_k, 32)  # packing takes whole words
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
    wrap_triton(kernels.shrink_kernel)[grid](
        x, a, t, _seed_arg(p, seed, x), t if bits is None else bits, M, K, R, _words(K),
        *x.stride(), *a.stride(), *t.stride(), p, _keep_scale(p),
        HAS_DROPOUT=p > 0, DOT_PRECISION=_dot_precision(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r,
        num_warps=warps, num_stages=stages, KEEP_BITS=bits is not None,
    )
    return t


def expand_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N, R = weight.shape[0], b.shape[0]
    if M == 0:
        return x.new_empty((M, N))
    key = _path_key("expand_linear", x, 0.0, M, N, K, R)
    fused = lambda: _expand_linear_fused(x, weight, bias, t, b)  # noqa: E731
    cublas = lambda: _expand_linear_cublas(x, weight, bias, t, b)  # noqa: E731
    return fused() if gemm_paths.choose(key, x, fused, cublas) == "fused" else cublas()


def _expand_linear_fused(x, weight, bias, t, b):
    M, K = x.shape
    N, R = weight.shape[0], b.shape[0]
    y = x.new_empty((M, N))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    block_r = rank_block(R, x.dtype)
    tiles = gemm_tiles(*_tiling("expand_linear", x, (K, N), (x, weight, y), 0.0, block_r))
    wrap_triton(_autotuned(kernels.expand_linear_kernel, tiles))[grid](
        x, weight, bias if bias is not None else x, t, b, y, M, N, K, R, m_bucket(M),
        *x.stride(), *weight.stride(), *t.stride(), *b.stride(), *y.stride(),
        HAS_BIAS=bias is not None, BLOCK_R=block_r, DOT_PRECISION=_dot_precision(),
    )
    return y


def _expand_linear_cublas(x, weight, bias, t, b):
    # The frozen GEMM on cuBLAS, then T B accumulated into its output (beta = 1).
    y = frozen_mm(x, weight.t()) if bias is None else frozen_addmm(bias, x, weight.t())
    return accumulate_mm(y, t, b)


# The cuBLAS path's GEMMs (compile_check replaces them: it records launches only).
frozen_mm, frozen_addmm, accumulate_mm = torch.mm, torch.addmm, torch.Tensor.addmm_


def _path_key(op, like, p, M, N, K, R) -> tuple:
    return (op, like.device, like.dtype, precision_class(like.dtype, torch.backends.cuda.matmul.allow_tf32), p > 0,
            m_bucket(M), N, K, R)


def shrink_expand_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                         b: torch.Tensor, p: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """shrink then expand_linear in one kernel: (y, T). For R <= ONE_PASS_MAX_RANK (configs.py)."""
    M, K = x.shape
    N, R = weight.shape[0], a.shape[1]
    if R > ONE_PASS_MAX_RANK:
        raise ValueError(f"msplora triton backend: shrink_expand_linear takes R <= {ONE_PASS_MAX_RANK}, got a of shape "
                         f"{tuple(a.shape)}; use shrink and expand_linear")
    y, t = x.new_empty((M, N)), x.new_empty((M, R))
    if M == 0:
        return y, t
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    block_r = rank_block(R, x.dtype)
    tiles = gemm_tiles(*_tiling("shrink_expand_linear", x, (K, N), (x, weight, y), p, block_r))
    wrap_triton(_autotuned(kernels.shrink_expand_linear_kernel, tiles))[grid](
        x, weight, bias if bias is not None else x, a, b, y, t, _seed_arg(p, seed, x), M, N, K, R, m_bucket(M),
        *x.stride(), *weight.stride(), *a.stride(), *b.stride(), *y.stride(), *t.stride(), p, _keep_scale(p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, BLOCK_R=block_r, DOT_PRECISION=_dot_precision(),
    )
    return y, t


def grad_t_b(dy: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = dy.shape
    R = b.shape[0]
    dt = dy.new_empty((M, R))
    db32 = torch.zeros((R, N), device=dy.device, dtype=torch.float32)
    if M > 0:
        block_r = rank_block(R, dy.dtype)
        block_m, block_n, warps, stages = skinny_tile(*_tiling("grad_t_b", dy, (N,), (dy,), 0.0, block_r))
        grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
        wrap_triton(kernels.grad_t_b_kernel)[grid](
            dy, t, b, dt, db32, M, N, R, *dy.stride(), *t.stride(), *b.stride(), *dt.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
            DOT_PRECISION=_dot_precision(),
        )
    return dt, db32.to(dy.dtype)


def grad_x(dy: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, p: float,
           seed: torch.Tensor) -> torch.Tensor:
    return _grad_x(dy, weight, dt, a, p, seed, None)


def grad_x_bits(dy: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, bits: torch.Tensor,
                p: float) -> torch.Tensor:
    return _grad_x(dy, weight, dt, a, p, None, bits)


def _grad_x(dy, weight, dt, a, p, seed, bits):
    M, N = dy.shape
    K, R = a.shape
    if M == 0:
        return dy.new_empty((M, K))
    key = _path_key("grad_x", dy, p, M, N, K, R)
    fused = lambda: _grad_x_fused(dy, weight, dt, a, p, seed, bits, dy.new_empty((M, K)), N)  # noqa: E731
    cublas = lambda: _grad_x_fused(dy, weight, dt, a, p, seed, bits, frozen_mm(dy, weight), 0)  # noqa: E731
    return fused() if gemm_paths.choose(key, dy, fused, cublas) == "fused" else cublas()


def _grad_x_fused(dy, weight, dt, a, p, seed, bits, dx, n):
    """dx = dy W + mask * (dT A^T) in one kernel (n = N); or, with n = 0, dx += mask * (dT A^T)
    into a dx that holds cuBLAS's dy W already."""
    M, K = dx.shape
    R = a.shape[1]
    # The output tile is (BLOCK_M, BLOCK_K); the autotuned BLOCK_N is the reduction step.
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    block_r = rank_block(R, dy.dtype)
    tiles = gemm_tiles(*_tiling("grad_x", dy, (K, dy.shape[1]), (dy, weight, dx), p, block_r))
    # Accumulating runs restore dx between autotuning trials, which would otherwise add up.
    kernel = _autotuned(kernels.grad_x_kernel, tiles, restore=("dx_ptr",) if n == 0 else ())
    wrap_triton(kernel)[grid](
        dy, weight, dt, a, dx, _seed_arg(p, seed, dy), dx if bits is None else bits, M, n, K, R, _words(K),
        m_bucket(M), *dy.stride(), *weight.stride(), *dt.stride(), *a.stride(), *dx.stride(), p, _keep_scale(p),
        HAS_DROPOUT=p > 0, BLOCK_R=block_r, DOT_PRECISION=_dot_precision(), ACCUMULATE=n == 0,
        MASK_BITS=bits is not None,
    )
    return dx


def grad_a(x: torch.Tensor, dt: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return _grad_a(x, dt, p, seed, None)


def grad_a_bits(x: torch.Tensor, dt: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    return _grad_a(x, dt, p, None, bits)


def _grad_a(x, dt, p, seed, bits):
    M, K = x.shape
    R = dt.shape[1]
    da32 = torch.zeros((K, R), device=x.device, dtype=torch.float32)
    if M > 0:
        block_r = rank_block(R, x.dtype)
        block_m, block_k, warps, stages = skinny_tile(*_tiling("grad_a", x, (K,), (x,), p, block_r))
        # Split the row reduction so that there are enough programs to fill the GPU.
        k_blocks = triton.cdiv(K, block_k) * triton.cdiv(R, block_r)
        splits = max(1, min(triton.cdiv(M, 4 * block_m), triton.cdiv(264, k_blocks)))
        rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
        grid = (triton.cdiv(K, block_k), triton.cdiv(M, rows_per_split), triton.cdiv(R, block_r))
        wrap_triton(kernels.grad_a_kernel)[grid](
            x, dt, da32, _seed_arg(p, seed, x), da32 if bits is None else bits, M, K, R, _words(K), rows_per_split,
            *x.stride(), *dt.stride(), p, _keep_scale(p),
            HAS_DROPOUT=p > 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
            DOT_PRECISION=_dot_precision(), MASK_BITS=bits is not None,
        )
    return da32.to(x.dtype)


def dropout_mask(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    out = torch.ones_like(x, memory_format=torch.contiguous_format)
    if M == 0 or p == 0:
        return out
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    wrap_triton(kernels.dropout_mask_kernel)[grid](out, seed, M, K, p, _keep_scale(p), BLOCK_M=32, BLOCK_K=32)
    return out


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    if p == 0:
        return x.clone(memory_format=torch.contiguous_format)
    out = x.new_empty((M, K))
    if M == 0:
        return out
    grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
    wrap_triton(kernels.dropout_kernel)[grid](x, out, seed, M, K, *x.stride(), p, _keep_scale(p), BLOCK_M=32, BLOCK_K=32)
    return out
