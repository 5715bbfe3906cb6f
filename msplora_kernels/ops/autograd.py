"""The autograd Function that composes any backend's op table (contract.py).

Forward:  A = [s_1 A_1 | ... | s_n A_n], B = [B_1; ...; B_n] (the levels joined, in x's dtype)
          T = dropout(x) A          (shrink, all levels at once)
          y = x W^T + b + T B      (expand, added into the base GEMM)
          (with the one_pass_forward capability: both in one kernel)
Backward: dT, dB = dy B^T, T^T dy   (one pass over dy)
          dx = dy W + mask * (dT A^T)
          dA = dropout(x)^T dT      (the mask regenerated from the seed; or dropout(x) kept from the
                                     forward: the keeps_dropped_input capability; or the mask
                                     packed 1 bit an element by the forward's shrink, for dx and
                                     dA: the keeps_mask_bits capability; with both, dropout(x)
                                     serves dA and the packed mask dx, drawn in one pass)
          dA_i, dB_i = s_i dA[:, level i], dB[level i]  (in each factor's dtype)
          dW = dy^T x, db = sum(dy) only when the base layer is trained.

The joining and splitting happen inside the Function, and the ops are called below the autograd
dispatch key: their own derivatives (derivatives.py) are for direct calls, and going through them
here would run Python on every op call even with grad mode off.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.autograd.function import once_differentiable

from .backends import BACKENDS


def _below_autograd():
    # Eager only: a compiled graph calls the ops without their autograd kernels anyway, and dynamo
    # cannot trace this guard.
    return contextlib.nullcontext() if torch.compiler.is_compiling() else torch._C._AutoDispatchBelowAutograd()


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)


@functools.cache
def _scale_row(scales: tuple, ranks: tuple, dtype, device):
    """Each level's scale repeated over its rank, as a (1, R) row of `dtype`; None where a scale
    rounds differently in `dtype` than in its op-math type, which a Python float scale is cast to
    (fp32 for bf16 and fp16): the product with the row would then differ."""
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.inference_mode(False):  # a row made in inference mode would be barred from training calls
        row = torch.tensor([s for s, r in zip(scales, ranks) for _ in range(r)], dtype=opmath)
        exact = bool((row.to(dtype).to(opmath) == row).all())
        return row.to(device=device, dtype=dtype).unsqueeze(0) if exact else None


def joined_factors(As, Bs, scales, dtype):
    # Each level scaled by its Python float (computed in the factor's op-math type, fp32 for
    # bf16, and rounded once), joined, then cast once. Where every scale is as exact in the
    # factors' one dtype (any in fp32; the paper's 16/8, 16/4, 16/2 in bf16), a row of them in
    # place after the join gives the same values in two ops instead of four: at small layers each
    # op costs more than its data. The row is in the factors' dtype: a bf16 tensor times an
    # fp32 row ran as three kernels (a cast each way).
    row = None
    if not torch.compiler.is_compiling() and len({a_i.dtype for a_i in As}) == 1:
        row = _scale_row(tuple(scales), tuple(a_i.shape[1] for a_i in As), As[0].dtype, As[0].device)
    if row is not None:
        a = torch.cat(list(As), dim=1).mul_(row)
    else:
        a = torch.cat(torch._foreach_mul(list(As), list(scales)), dim=1)
    return _as(a, dtype), _as(torch.cat(Bs, dim=0), dtype)


def _split(grad, ranks, dim, dtypes):
    if len(set(dtypes)) == 1:  # the usual case: one cast for all levels, then views
        return list(_as(grad, dtypes[0]).split_with_sizes(ranks, dim=dim))
    return [_as(g, dtype) for g, dtype in zip(grad.split_with_sizes(ranks, dim=dim), dtypes)]


def _keeps_dropped_input(backend, p, need_as) -> bool:
    """Whether this forward keeps dropout(x) for dA rather than the backward regenerating it: where
    the backend can (on the CPU, compute is scarcer than memory: it costs one (M, K) tensor per
    layer, less than PEFT's LoRA keeps), with dropout on, and only when some A needs a gradient."""
    return backend.keeps_dropped_input and p > 0 and any(need_as)


def _shrink(ops, backend, x, a, p, seed, need_as, need_x_mask):
    """(T = dropout(x) A, dropout(x) where the forward keeps it for dA, the packed mask where the
    backend keeps that for the backward); None for what is not kept. need_x_mask: dx will apply
    the mask (the packed one where the backend keeps it)."""
    if _keeps_dropped_input(backend, p, need_as):
        if backend.keeps_mask_bits and need_x_mask:
            x_lora, bits = ops.dropout_keep_mask(x, p, seed)
        else:
            x_lora, bits = ops.dropout(x, p, seed), None
        return ops.shrink(x_lora, a, 0.0, seed), x_lora, bits
    if backend.keeps_mask_bits and p > 0 and (need_x_mask or any(need_as)):
        t, bits = ops.shrink_keep_mask(x, a, p, seed)
        return t, None, bits
    return ops.shrink(x, a, p, seed), None, None


def _factor_grads(ctx, ops, x, x_lora, bits, dt, db, seed, need_as, need_bs):
    """dA_i = s_i dropout(x)^T dT_i and dB_i, split by level into each factor's dtype."""
    da_levels = db_levels = [None] * len(ctx.ranks)
    if any(need_as):
        if x_lora is not None:
            da = ops.grad_a(x_lora, dt, 0.0, seed)
        elif bits is not None:
            da = ops.grad_a_bits(x, dt, bits, ctx.p)
        else:
            da = ops.grad_a(x, dt, ctx.p, seed)
        # Split, then scaled level by level: new contiguous tensors, which the gradient
        # accumulation adds at full speed (a split view of dA has a stride of R).
        scaled = torch._foreach_mul(list(da.split_with_sizes(ctx.ranks, dim=1)), list(ctx.scales))
        da_levels = [_as(g, dtype) for g, dtype in zip(scaled, ctx.a_dtypes)]
    if any(need_bs):
        db_levels = _split(db, ctx.ranks, 0, ctx.b_dtypes)
    return da_levels, db_levels


def _levels(factors, backend_name):
    """A call's factors as (As, Bs), and its backend."""
    levels = len(factors) // 2
    return factors[:levels], factors[levels:], BACKENDS[backend_name]


def _remember(ctx, p, backend_name, scales, As, Bs):
    # What the backward needs besides tensors: dropout, backend, and each level's scale, rank and dtypes.
    ctx.p, ctx.backend_name, ctx.scales, ctx.ranks = p, backend_name, scales, tuple(a_i.shape[1] for a_i in As)
    ctx.a_dtypes, ctx.b_dtypes = [a_i.dtype for a_i in As], [b_i.dtype for b_i in Bs]


class FusedMSPLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, p: float, seed, backend_name: str, scales, *factors):
        As, Bs, backend = _levels(factors, backend_name)
        levels, ops = len(As), backend.ops
        x_lora = bits = None  # dropout(x) or the packed mask, when one is kept for the backward
        need_as = ctx.needs_input_grad[7 : 7 + levels]
        with _below_autograd():
            a, b = joined_factors(As, Bs, scales, x.dtype)
            if backend.one_pass_forward(a.shape[1]):
                y, t = ops.shrink_expand_linear(x, weight, bias, a, b, p, seed)
            else:
                t, x_lora, bits = _shrink(ops, backend, x, a, p, seed, need_as, ctx.needs_input_grad[0])
                y = ops.expand_linear(x, weight, bias, t, b)
        # x itself is needed again only for a trained base weight's gradient.
        x_saved = x if x_lora is None or ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_saved, x_lora, bits, weight, a, b, t, seed)
        _remember(ctx, p, backend_name, scales, As, Bs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, x_lora, bits, weight, a, b, t, seed = ctx.saved_tensors
        levels = len(ctx.ranks)
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_as, need_bs = ctx.needs_input_grad[7 : 7 + levels], ctx.needs_input_grad[7 + levels :]
        ops = BACKENDS[ctx.backend_name].ops
        dx = dw = dbias = None
        da_levels = db_levels = [None] * levels
        with _below_autograd():
            dy = dy.contiguous()
            if need_x or any(need_as) or any(need_bs):
                dt, db = ops.grad_t_b(dy, t, b)
                if need_x and bits is not None:
                    dx = ops.grad_x_bits(dy, weight, dt, a, bits, ctx.p)
                elif need_x:
                    dx = ops.grad_x(dy, weight, dt, a, ctx.p, seed)
                da_levels, db_levels = _factor_grads(ctx, ops, x, x_lora, bits, dt, db, seed, need_as, need_bs)
            if need_w:
                dw = dy.t().mm(x)
            if need_bias:
                dbias = dy.sum(0)
        return (dx, dw, dbias, None, None, None, None, *da_levels, *db_levels)


class FusedLoRAAddFunction(torch.autograd.Function):
    """y + sum_i s_i (dropout(x) A_i) B_i, for a base output y that another layer computed (a
    quantized layer's own forward, whose autograd gives the base's part of dx). T B accumulates
    into y in place (beta = 1) where y is a tensor of its own, so the adapter costs no extra pass
    over y; the gradient to y is dy itself."""

    @staticmethod
    def forward(ctx, y, x, p: float, seed, backend_name: str, scales, *factors):
        As, Bs, backend = _levels(factors, backend_name)
        levels, ops = len(As), backend.ops
        with _below_autograd():
            a, b = joined_factors(As, Bs, scales, x.dtype)
            need_as = ctx.needs_input_grad[6 : 6 + levels]
            # The packed mask serves dA only: dx's adapter term is masked by ops.dropout below.
            t, x_lora, bits = _shrink(ops, backend, x, a, p, seed, need_as, need_x_mask=False)
            y2d = y.view(-1, y.shape[-1]) if y.is_contiguous() else None
            if y2d is not None and y._base is None and not (y.is_leaf and y.requires_grad):
                y2d.addmm_(t, b)
                ctx.mark_dirty(y)
                out = y
            else:
                out = torch.addmm(y.reshape(-1, y.shape[-1]), t, b).view(y.shape)
        ctx.save_for_backward(x if x_lora is None else None, x_lora, bits, a, b, t, seed)
        _remember(ctx, p, backend_name, scales, As, Bs)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, x_lora, bits, a, b, t, seed = ctx.saved_tensors
        levels = len(ctx.ranks)
        need_x = ctx.needs_input_grad[1]
        need_as, need_bs = ctx.needs_input_grad[6 : 6 + levels], ctx.needs_input_grad[6 + levels :]
        ops = BACKENDS[ctx.backend_name].ops
        dx = None
        da_levels = db_levels = [None] * levels
        with _below_autograd():
            dy2d = dy.reshape(-1, dy.shape[-1]).contiguous()
            if need_x or any(need_as) or any(need_bs):
                dt, db = ops.grad_t_b(dy2d, t, b)
                if need_x:
                    # Only the adapter's term: the base layer's autograd adds its own.
                    lora = dt.mm(a.t())
                    dx = ops.dropout(lora, ctx.p, seed) if ctx.p > 0 else lora
                da_levels, db_levels = _factor_grads(ctx, ops, x, x_lora, bits, dt, db, seed, need_as, need_bs)
        return (dy, dx, None, None, None, None, *da_levels, *db_levels)
