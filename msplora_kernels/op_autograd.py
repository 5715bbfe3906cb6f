"""Autograd formulas of the primitive ops, for both op tables (msplora:: and msplora_triton::).

The training path differentiates through FusedMSPLoRAFunction, which composes these ops in its
own backward. These formulas make each op differentiable on its own as well, so a direct call,
torch.library.opcheck and AOT autograd all see a complete op. They use plain PyTorch matmuls.
"""
from __future__ import annotations

import torch


def _mask(x, p, seed, namespace):
    return getattr(torch.ops, namespace).dropout_mask(x.contiguous(), p, seed) if p > 0 else None


def _masked(t, mask):
    return t if mask is None else t * mask


def register(namespace: str) -> None:
    def shrink_setup(ctx, inputs, output):
        x, a, p, seed = inputs
        ctx.save_for_backward(x, a, seed)
        ctx.p = p

    def shrink_backward(ctx, dt):
        x, a, seed = ctx.saved_tensors
        mask = _mask(x, ctx.p, seed, namespace)
        dx = _masked(dt @ a.T, mask) if ctx.needs_input_grad[0] else None
        da = _masked(x, mask).T @ dt if ctx.needs_input_grad[1] else None
        return dx, da, None, None

    def expand_setup(ctx, inputs, output):
        x, weight, bias, t, b = inputs
        ctx.save_for_backward(x, weight, t, b)
        ctx.has_bias = bias is not None

    def expand_backward(ctx, dy):
        x, weight, t, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (dy @ weight if need[0] else None, dy.T @ x if need[1] else None,
                dy.sum(0) if ctx.has_bias and need[2] else None, dy @ b.T if need[3] else None,
                t.T @ dy if need[4] else None)

    def gtb_setup(ctx, inputs, output):
        dy, t, b = inputs
        ctx.save_for_backward(dy, t, b)

    def gtb_backward(ctx, g_dt, g_db):
        dy, t, b = ctx.saved_tensors
        g_dt = torch.zeros(dy.shape[0], b.shape[0], dtype=dy.dtype, device=dy.device) if g_dt is None else g_dt
        g_db = torch.zeros_like(b) if g_db is None else g_db
        need = ctx.needs_input_grad
        return (g_dt @ b + t @ g_db if need[0] else None, dy @ g_db.T if need[1] else None,
                g_dt.T @ dy if need[2] else None)

    def gx_setup(ctx, inputs, output):
        dy, weight, dt, a, p, seed = inputs
        ctx.save_for_backward(dy, weight, dt, a, seed)
        ctx.p = p

    def gx_backward(ctx, g):
        dy, weight, dt, a, seed = ctx.saved_tensors
        gm = _masked(g, _mask(g, ctx.p, seed, namespace))
        need = ctx.needs_input_grad
        return (g @ weight.T if need[0] else None, dy.T @ g if need[1] else None,
                gm @ a if need[2] else None, gm.T @ dt if need[3] else None, None, None)

    def ga_setup(ctx, inputs, output):
        x, dt, p, seed = inputs
        ctx.save_for_backward(x, dt, seed)
        ctx.p = p

    def ga_backward(ctx, g):
        x, dt, seed = ctx.saved_tensors
        mask = _mask(x, ctx.p, seed, namespace)
        need = ctx.needs_input_grad
        return (_masked(dt @ g.T, mask) if need[0] else None, _masked(x, mask) @ g if need[1] else None, None, None)

    def mask_backward(ctx, g):
        return None, None, None

    for name, backward, setup in [
        ("shrink", shrink_backward, shrink_setup),
        ("expand_linear", expand_backward, expand_setup),
        ("grad_t_b", gtb_backward, gtb_setup),
        ("grad_x", gx_backward, gx_setup),
        ("grad_a", ga_backward, ga_setup),
        ("dropout_mask", mask_backward, None),
    ]:
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup)


def register_dropout(namespace: str) -> None:
    """dropout(x): the compiled backends' op that returns the masked input itself."""

    def setup(ctx, inputs, output):
        x, p, seed = inputs
        ctx.save_for_backward(seed)
        ctx.p = p

    def backward(ctx, g):
        (seed,) = ctx.saved_tensors
        return _masked(g, _mask(g, ctx.p, seed, namespace)), None, None

    torch.library.register_autograd(f"{namespace}::dropout", backward, setup_context=setup)


def register_shrink_expand_linear(namespace: str) -> None:
    """The one-pass forward (y, T) = expand_linear(x, W, b, shrink(x, A), B), Triton only."""

    def setup(ctx, inputs, output):
        x, weight, bias, a, b, p, seed = inputs
        ctx.save_for_backward(x, weight, a, b, seed, output[1])
        ctx.p, ctx.has_bias = p, bias is not None

    def backward(ctx, g_y, g_t):
        x, weight, a, b, seed, t = ctx.saved_tensors
        g_y = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device) if g_y is None else g_y
        dt = g_y @ b.T if g_t is None else g_y @ b.T + g_t
        mask = _mask(x, ctx.p, seed, namespace)
        need = ctx.needs_input_grad
        return (g_y @ weight + _masked(dt @ a.T, mask) if need[0] else None, g_y.T @ x if need[1] else None,
                g_y.sum(0) if ctx.has_bias and need[2] else None, _masked(x, mask).T @ dt if need[3] else None,
                t.T @ g_y if need[4] else None, None, None)

    torch.library.register_autograd(f"{namespace}::shrink_expand_linear", backward, setup_context=setup)
