"""The MSPLoRA math in plain PyTorch: the oracle of every test and the "torch" backend.

    y = x W^T + b + sum_i s_i (dropout(x) A_i) B_i

with one dropout mask on x shared by all levels. Autograd derives every gradient.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def torch_dropout_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """Inverted-dropout multiplier (0 or 1/(1-p)) drawn from a generator seeded with `seed`."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def msplora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Level-by-level MSPLoRA linear. `dropout_mask` multiplies x in the adapter branch only."""
    y = torch.nn.functional.linear(x, weight, bias)
    x_lora = x if dropout_mask is None else x * dropout_mask.reshape(x.shape)
    for a, b, s in zip(As, Bs, scales):
        y = y + s * ((x_lora @ a) @ b)
    return y


def delta_weight_reference(As, Bs, scales) -> torch.Tensor:
    """The dense update sum_i s_i (A_i B_i)^T, shaped like nn.Linear's weight."""
    return sum(s * (a @ b) for a, b, s in zip(As, Bs, scales)).T
