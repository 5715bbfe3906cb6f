"""msplora_linear: the functional form of the layer, on any backend."""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .autograd import FusedLoRAAddFunction, FusedMSPLoRAFunction, joined_factors
from .backends import resolve_backend
from .validation import check_add_inputs, check_inputs, check_same_dtype

_SEED_HIGH = 2**31 - 1


def draw_seed(device) -> torch.Tensor:
    """A dropout seed from torch's RNG, as a one-element int64 tensor on `device`.

    Drawn from the global generator, so torch.manual_seed makes runs repeatable
    and activation checkpointing (which restores RNG state) redraws the same mask.
    """
    return torch.randint(0, _SEED_HIGH, (1,), device=device, dtype=torch.int64)


_NO_SEED: dict = {}


def no_seed(device) -> torch.Tensor:
    """The empty seed of a call without dropout: one per device in eager (never written, so it
    can be shared), a new one under torch.compile, which traces it."""
    if torch.compiler.is_compiling():
        return torch.empty(0, dtype=torch.int64, device=device)
    if device not in _NO_SEED:
        with torch.inference_mode(False):
            _NO_SEED[device] = torch.empty(0, dtype=torch.int64, device=device)
    return _NO_SEED[device]


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t, dtype):
    # Like autocast: only the float types autocast touches are cast; fp64 stays.
    if t is None or t.dtype == dtype or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def msplora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y = x W^T + b + sum_i scales[i] * (dropout(x) As[i]) Bs[i].

    x is (..., in_features), weight (out_features, in_features), As[i] (in_features, r_i),
    Bs[i] (r_i, out_features). One dropout mask on x is shared by all levels and applies
    only when `training` and dropout_p > 0. Adapter factors of another float dtype than x
    are cast to x's dtype (gradients flow back in theirs), so fp32 adapters can sit on a
    bf16 base. Under torch.autocast the inputs are cast like nn.Linear's.
    """
    amp_dtype = _autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    check_inputs(x, weight, bias, As, Bs, scales, dropout_p, same_dtype=amp_dtype is None)
    if amp_dtype is not None:
        x, weight, bias = _cast(x, amp_dtype), _cast(weight, amp_dtype), _cast(bias, amp_dtype)
        check_same_dtype(x, weight, bias)  # fp64 is left uncast, as autocast leaves it
    name = resolve_backend(backend, x.device, x.dtype)
    p = float(dropout_p) if training else 0.0
    with torch.autocast(x.device.type, enabled=False) if amp_dtype is not None else contextlib.nullcontext():
        seed = draw_seed(x.device) if p > 0 else no_seed(x.device)
        # The Function casts factors of another dtype to x's after scaling, and their gradients back.
        # Rows in, rows out; a 2-D x is passed as it is, since even a no-op reshape adds autograd nodes.
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = FusedMSPLoRAFunction.apply(x2d.contiguous(), weight, bias, p, seed, name, tuple(float(s) for s in scales),
                                       *As, *Bs)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


def msplora_add(
    y: torch.Tensor,
    x: torch.Tensor,
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """y + sum_i scales[i] * (dropout(x) As[i]) Bs[i], where y (..., out_features) is a base layer's
    output for x (..., in_features) computed elsewhere: a quantized layer's own forward, whose
    autograd gives the base's share of dx. The adapter's term is added into y in place where y is
    a tensor of its own (the gradient to y is the output's gradient). Runs in x's dtype on any
    backend, as msplora_linear does."""
    check_add_inputs(y, x, As, Bs, scales, dropout_p)
    name = resolve_backend(backend, x.device, x.dtype)
    p = float(dropout_p) if training else 0.0
    amp = _autocast_dtype(x.device.type) is not None
    with torch.autocast(x.device.type, enabled=False) if amp else contextlib.nullcontext():
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        seed = draw_seed(x.device) if p > 0 else no_seed(x.device)
        return FusedLoRAAddFunction.apply(y, x2d, p, seed, name, tuple(float(s) for s in scales), *As, *Bs)


def add_joined_update(y: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y += (x a) b in place and returns y: the adapter's term at inference, with the levels
    joined once (joined_factors: a = [s_1 A_1 | ... | s_n A_n], b = [B_1; ...; B_n], in x's dtype)
    and a passed transposed, a_t = a^T as an (R, in_features) row-major tensor. y is the base
    output for x, a tensor of its own; no dropout, no autograd: for calls that need no gradient,
    where the autograd Function's fixed costs would outweigh a token's GEMMs.

    The shrink runs as F.linear(x, a_t), nn.Linear's own call: at a few tokens the library's
    skinny matrix product (x.mm(a)) costs several times more than its linear path, and F.linear
    takes x of any rank without a reshape. The expand adds into y in place."""
    t = F.linear(x, a_t)
    if y.dim() == 2 and y.is_contiguous():
        return y.addmm_(t, b)
    y = y if y.is_contiguous() else y.contiguous()
    y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), b)
    return y