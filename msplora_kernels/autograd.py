"""The autograd Function that composes a fused backend's ops.

Forward:  A = [s_1 A_1 | ... | s_n A_n], B = [B_1; ...; B_n] (the levels joined, in x's dtype)
          T = dropout(x) A          (shrink, all levels at once)
          y = x W^T + b + T B      (expand, added into the base GEMM)
Backward: dT, dB = dy B^T, T^T dy   (one pass over dy)
          dx = dy W + mask * (dT A^T)
          dA = dropout(x)^T dT      (mask regenerated from the seed)
          dA_i, dB_i = s_i dA[:, level i], dB[level i]  (in each factor's dtype)
          dW = dy^T x, db = sum(dy) only when the base layer is trained.

The joining and splitting happen inside the Function, and the ops are called below the autograd
dispatch key: each op's own autograd formula (op_autograd.py) is for direct calls, and going
through it here cost about 13 us of Python per op call, on every layer, forward and backward.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from .backends import fused_op_table


def _below_autograd():
    # Eager only: a compiled graph calls the ops without their autograd kernels anyway, and dynamo
    # cannot trace this guard.
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._AutoDispatchBelowAutograd()


def _joined(As, Bs, scales, dtype):
    # One multi-tensor op scales every level, one cat joins them: two launches for A, one for B.
    a = torch.cat(torch._foreach_mul(list(As), list(scales)), dim=1).to(dtype)
    b = torch.cat(list(Bs), dim=0).to(dtype)
    return a, b


def _split_da(da, ranks, scales, dtypes):
    levels = torch._foreach_mul(list(torch.split(da, ranks, dim=1)), list(scales))
    return [g.to(dtype) for g, dtype in zip(levels, dtypes)]


def _split_db(db, ranks, dtypes):
    return [g.to(dtype) for g, dtype in zip(torch.split(db, ranks, dim=0), dtypes)]


class FusedMSPLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p: float, seed, backend: str, scales, *factors):
        levels = len(factors) // 2
        As, Bs = factors[:levels], factors[levels:]
        ops = fused_op_table(backend)
        with _below_autograd():
            a, b = _joined(As, Bs, scales, x.dtype)
            t = ops.shrink(x, a, p, seed)
            y = ops.expand_linear(x, weight, bias, t, b)
        ctx.save_for_backward(x, weight, a, b, t, seed)
        ctx.p, ctx.backend, ctx.scales = p, backend, scales
        ctx.ranks = [a_i.shape[1] for a_i in As]
        ctx.a_dtypes, ctx.b_dtypes = [a_i.dtype for a_i in As], [b_i.dtype for b_i in Bs]
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, a, b, t, seed = ctx.saved_tensors
        levels = len(ctx.ranks)
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_as, need_bs = ctx.needs_input_grad[7 : 7 + levels], ctx.needs_input_grad[7 + levels :]
        ops = fused_op_table(ctx.backend)
        dx = dw = dbias = None
        da_levels = db_levels = [None] * levels
        with _below_autograd():
            dy = dy.contiguous()
            if need_x or any(need_as) or any(need_bs):
                dt, db = ops.grad_t_b(dy, t, b)
                if need_x:
                    dx = ops.grad_x(dy, weight, dt, a, ctx.p, seed)
                if any(need_as):
                    da_levels = _split_da(ops.grad_a(x, dt, ctx.p, seed), ctx.ranks, ctx.scales, ctx.a_dtypes)
                if any(need_bs):
                    db_levels = _split_db(db, ctx.ranks, ctx.b_dtypes)
            if need_w:
                dw = dy.t().mm(x)
            if need_bias:
                dbias = dy.sum(0)
        return (dx, dw, dbias, None, None, None, None, *da_levels, *db_levels)
