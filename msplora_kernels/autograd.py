"""The autograd Function that composes a fused backend's ops.

Forward:  T = dropout(x) A          (shrink, all levels at once)
          y = x W^T + b + T B      (expand, added into the base GEMM)
Backward: dT, dB = dy B^T, T^T dy   (one pass over dy)
          dx = dy W + mask * (dT A^T)
          dA = dropout(x)^T dT      (mask regenerated from the seed)
          dW = dy^T x, db = sum(dy) only when the base layer is trained.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .backends import fused_op_table


class FusedMSPLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, p: float, seed, backend: str):
        ops = fused_op_table(backend)
        t = ops.shrink(x, a, p, seed)
        y = ops.expand_linear(x, weight, bias, t, b)
        ctx.save_for_backward(x, weight, a, b, t, seed)
        ctx.p, ctx.backend = p, backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, a, b, t, seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        ops = fused_op_table(ctx.backend)
        dy = dy.contiguous()
        dx = dw = dbias = da = db = None
        if need_x or need_a or need_b:
            dt, db = ops.grad_t_b(dy, t, b)
            if need_x:
                dx = ops.grad_x(dy, weight, dt, a, ctx.p, seed)
            if need_a:
                da = ops.grad_a(x, dt, ctx.p, seed)
            if not need_b:
                db = None
        if need_w:
            dw = dy.t().mm(x)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None, None, None
