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

from . import kernels
from .configs import ONE_PASS_MAX_RANK, gemm_configs, rank_block, skinny_tiles


def _autotuned(kernel) -> dict:
    """{inputs are fp32: autotuned kernel}: fp32 needs smaller tiles than bf16/fp16 (configs.py).
    Tuned once per power-of-two bucket of the token count (M_BUCKET), not per M: a new batch
    shape in the same bucket reuses the choice."""
    return {fp32: triton.autotune(gemm_configs(torch.float32 if fp32 else torch.bfloat16),
                                  key=["M_BUCKET", "N", "K", "R"])(kernel) for fp32 in (False, True)}


def m_bucket(m: int) -> int:
    """The power of two at or above m (at least 16), the autotune key's token count."""
    return max(16, triton.next_power_of_2(m))


_EXPAND_LINEAR = _autotuned(kernels.expand_linear_kernel)
_SHRINK_EXPAND_LINEAR = _autotuned(kernels.shrink_expand_linear_kernel)
# In grad_x the output tile is (BLOCK_M, BLOCK_K) and BLOCK_N is the reduction step.
_GRAD_X = _autotuned(kernels.grad_x_kernel)


def _keep_scale(p: float) -> float:
    return 1.0 / (1.0 - p)


def _dot_precision() -> str:
    # Follow torch: fp32 matmuls use TF32 only where the user allowed it.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _seed_arg(p: float, seed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Without dropout the kernel never reads the seed, but Triton's launcher still
    # rejects the null pointer of an empty tensor; any valid pointer will do.
    return seed if p > 0 else like


def shrink(x: torch.Tensor, a: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    R = a.shape[1]
    t = x.new_empty((M, R))
    if M == 0:
        return t
    block_m, block_k, warps, stages = skinny_tiles(x.dtype)
    block_r = rank_block(R, x.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
    wrap_triton(kernels.shrink_kernel)[grid](
        x, a, t, _seed_arg(p, seed, x), M, K, R, *x.stride(), *a.stride(), *t.stride(), p, _keep_scale(p),
        HAS_DROPOUT=p > 0, DOT_PRECISION=_dot_precision(), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
    )
    return t


def expand_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N, R = weight.shape[0], b.shape[0]
    y = x.new_empty((M, N))
    if M == 0:
        return y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    wrap_triton(_EXPAND_LINEAR[x.dtype == torch.float32])[grid](
        x, weight, bias if bias is not None else x, t, b, y, M, N, K, R, m_bucket(M),
        *x.stride(), *weight.stride(), *t.stride(), *b.stride(), *y.stride(),
        HAS_BIAS=bias is not None, BLOCK_R=rank_block(R, x.dtype), DOT_PRECISION=_dot_precision(),
    )
    return y


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
    wrap_triton(_SHRINK_EXPAND_LINEAR[x.dtype == torch.float32])[grid](
        x, weight, bias if bias is not None else x, a, b, y, t, _seed_arg(p, seed, x), M, N, K, R, m_bucket(M),
        *x.stride(), *weight.stride(), *a.stride(), *b.stride(), *y.stride(), *t.stride(), p, _keep_scale(p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, BLOCK_R=rank_block(R, x.dtype),
        DOT_PRECISION=_dot_precision(),
    )
    return y, t


def grad_t_b(dy: torch.Tensor, t: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = dy.shape
    R = b.shape[0]
    dt = dy.new_empty((M, R))
    db32 = torch.zeros((R, N), device=dy.device, dtype=torch.float32)
    if M > 0:
        block_m, block_n, warps, stages = skinny_tiles(dy.dtype)
        block_r = rank_block(R, dy.dtype)
        grid = (triton.cdiv(M, block_m), triton.cdiv(R, block_r))
        wrap_triton(kernels.grad_t_b_kernel)[grid](
            dy, t, b, dt, db32, M, N, R, *dy.stride(), *t.stride(), *b.stride(), *dt.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
            DOT_PRECISION=_dot_precision(),
        )
    return dt, db32.to(dy.dtype)


def grad_x(dy: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, p: float,
           seed: torch.Tensor) -> torch.Tensor:
    M, N = dy.shape
    K, R = a.shape
    dx = dy.new_empty((M, K))
    if M == 0:
        return dx
    # The output tile is (BLOCK_M, BLOCK_K); the autotuned BLOCK_N is the reduction step.
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
    wrap_triton(_GRAD_X[dy.dtype == torch.float32])[grid](
        dy, weight, dt, a, dx, _seed_arg(p, seed, dy), M, N, K, R, m_bucket(M),
        *dy.stride(), *weight.stride(), *dt.stride(), *a.stride(), *dx.stride(), p, _keep_scale(p),
        HAS_DROPOUT=p > 0, BLOCK_R=rank_block(R, dy.dtype), DOT_PRECISION=_dot_precision(),
    )
    return dx


def grad_a(x: torch.Tensor, dt: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    R = dt.shape[1]
    da32 = torch.zeros((K, R), device=x.device, dtype=torch.float32)
    if M > 0:
        block_m, block_k, warps, stages = skinny_tiles(x.dtype)
        block_r = rank_block(R, x.dtype)
        # Split the row reduction so that there are enough programs to fill the GPU.
        k_blocks = triton.cdiv(K, block_k) * triton.cdiv(R, block_r)
        splits = max(1, min(triton.cdiv(M, 4 * block_m), triton.cdiv(264, k_blocks)))
        rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
        grid = (triton.cdiv(K, block_k), triton.cdiv(M, rows_per_split), triton.cdiv(R, block_r))
        wrap_triton(kernels.grad_a_kernel)[grid](
            x, dt, da32, _seed_arg(p, seed, x), M, K, R, rows_per_split, *x.stride(), *dt.stride(), p, _keep_scale(p),
            HAS_DROPOUT=p > 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps, num_stages=stages,
            DOT_PRECISION=_dot_precision(),
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
