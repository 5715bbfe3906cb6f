"""Each primitive op's own derivative, for the compiled (msplora::) and Triton (msplora_triton::) ops.

Training never uses these: FusedMSPLoRAFunction (autograd.py) composes the ops below autograd
and has its own backward. They earn their place elsewhere: a direct call of an op
(torch.ops.msplora.shrink on tensors that need gradients) gets the right gradient instead of
none, and torch.library.opcheck, which tests/test_opcheck.py runs on every op, requires an
autograd registration. Plain PyTorch, with the reference's mask.
"""
from __future__ import annotations

import torch

from .contract import SPECS, arg_names
from .reference import dropout_mask, unpack_mask


def _masked(t, p, seed):
    return t * dropout_mask(t, p, seed) if p > 0 else t


def _masked_bits(t, p, bits):
    # The same multiplier, read from a packed mask (contract.py) instead of the seed.
    return t * unpack_mask(bits, t.shape[1]).to(t.dtype) * (1.0 / (1.0 - p)) if p > 0 else t


def _zeros_if_none(g, *shape, like):
    return torch.zeros(*shape, dtype=like.dtype, device=like.device) if g is None else g


def _setup(saved_inputs, p_index, saved_output):
    """A setup_context that saves the given inputs (and one output) and keeps p."""
    def setup(ctx, inputs, output):
        outputs = (output[saved_output],) if saved_output is not None else ()
        ctx.save_for_backward(*(inputs[i] for i in saved_inputs), *outputs)
        ctx.p = float(inputs[p_index]) if p_index is not None else 0.0
        ctx.has_bias = len(inputs) > 2 and inputs[2] is not None  # expand_linear's and the one-pass op's

    return setup


def _shrink(ctx, dt):
    x, a, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (_masked(dt @ a.T, ctx.p, seed) if need[0] else None,
            _masked(x, ctx.p, seed).T @ dt if need[1] else None, None, None)


def _expand_linear(ctx, dy):
    x, weight, t, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (dy @ weight if need[0] else None, dy.T @ x if need[1] else None,
            dy.sum(0) if ctx.has_bias and need[2] else None, dy @ b.T if need[3] else None,
            t.T @ dy if need[4] else None)


def _grad_t_b(ctx, g_dt, g_db):
    dy, t, b = ctx.saved_tensors
    g_dt = _zeros_if_none(g_dt, dy.shape[0], b.shape[0], like=dy)
    g_db = _zeros_if_none(g_db, *b.shape, like=b)
    need = ctx.needs_input_grad
    return (g_dt @ b + t @ g_db if need[0] else None, dy @ g_db.T if need[1] else None,
            g_dt.T @ dy if need[2] else None)


def _mask_of(ctx, source):
    """The multiplier dropout applied, from what the op was given: a seed (int64, one element)
    or the forward's packed mask (int32, contract.py)."""
    if source.dtype == torch.int32:
        return lambda t: _masked_bits(t, ctx.p, source)
    return lambda t: _masked(t, ctx.p, source)


def _grad_x(ctx, g):
    # grad_x and grad_x_bits: dx = dy W + mask * (dt a^T), the mask from a seed or from bits.
    dy, weight, dt, a, source = ctx.saved_tensors
    gm = _mask_of(ctx, source)(g)
    need = ctx.needs_input_grad
    return (g @ weight.T if need[0] else None, dy.T @ g if need[1] else None,
            gm @ a if need[2] else None, gm.T @ dt if need[3] else None, None, None)


def _grad_a(ctx, g):
    # grad_a and grad_a_bits.
    x, dt, source = ctx.saved_tensors
    masked = _mask_of(ctx, source)
    need = ctx.needs_input_grad
    return (masked(dt @ g.T) if need[0] else None, masked(x) @ g if need[1] else None, None, None)


def _dropout(ctx, g):
    (seed,) = ctx.saved_tensors
    return _masked(g, ctx.p, seed), None, None


def _dropout_mask(ctx, g):
    return None, None, None


def _shrink_expand_linear(ctx, g_y, g_t):
    x, weight, a, b, seed, t = ctx.saved_tensors
    g_y = _zeros_if_none(g_y, x.shape[0], weight.shape[0], like=x)
    dt = g_y @ b.T if g_t is None else g_y @ b.T + g_t
    need = ctx.needs_input_grad
    return (g_y @ weight + _masked(dt @ a.T, ctx.p, seed) if need[0] else None, g_y.T @ x if need[1] else None,
            g_y.sum(0) if ctx.has_bias and need[2] else None, _masked(x, ctx.p, seed).T @ dt if need[3] else None,
            t.T @ g_y if need[4] else None, None, None)


def _shrink_keep_mask(ctx, dt, g_bits):
    x, a, _ = ctx.saved_tensors
    return _shrink(ctx, _zeros_if_none(dt, x.shape[0], a.shape[1], like=x))


def _dropout_keep_mask(ctx, g, g_bits):
    (seed,) = ctx.saved_tensors
    return (None if g is None else _masked(g, ctx.p, seed)), None, None


# op name -> (backward, the inputs it saves, the index of p, the output it saves)
# Each op's derivative, the inputs it saves (by their names in the op's schema, contract.py), and
# the output it saves, by index, if any. The dropout probability, where the op takes one, is its
# argument `p`.
FORMULAS = {
    "shrink": (_shrink, ("x", "a", "seed"), None),
    "expand_linear": (_expand_linear, ("x", "weight", "t", "b"), None),
    "grad_t_b": (_grad_t_b, ("dy", "t", "b"), None),
    "grad_x": (_grad_x, ("dy", "weight", "dt", "a", "seed"), None),
    "grad_a": (_grad_a, ("x", "dt", "seed"), None),
    "dropout_mask": (_dropout_mask, (), None),
    "dropout": (_dropout, ("seed",), None),
    "shrink_expand_linear": (_shrink_expand_linear, ("x", "weight", "a", "b", "seed"), 1),
    "shrink_keep_mask": (_shrink_keep_mask, ("x", "a", "seed"), None),
    "grad_x_bits": (_grad_x, ("dy", "weight", "dt", "a", "bits"), None),
    "grad_a_bits": (_grad_a, ("x", "dt", "bits"), None),
    "dropout_keep_mask": (_dropout_keep_mask, ("seed",), None),
}


def register(namespace: str, names) -> None:
    """Register the derivatives of the ops `names` of `namespace`."""
    for name in names:
        backward, saved, saved_output = FORMULAS[name]
        args = arg_names(SPECS[name])
        torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=_setup(
            [args.index(a) for a in saved], args.index("p") if "p" in args else None, saved_output))
