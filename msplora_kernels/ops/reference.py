"""The MSPLoRA math in plain PyTorch: the oracle of every test, and the "torch" backend's ops.

    y = x W^T + b + sum_i s_i (dropout(x) A_i) B_i

with one dropout mask on x shared by all levels. The mask of element `index` of the logical
(rows x in_features) input is a hash of (seed, index), the same on every backend, so the
backward can regenerate it and any backend can be compared with this file bit for bit in its
mask. The hash's constants are defined here; csrc/dropout_hash.h and triton_kernels/kernels.py
hold copies that tests/test_op_contract.py checks against these.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

# splitmix64's finalizer over a Weyl sequence keyed by the seed: z = index + seed * WEYL, then
# z ^= z >> S1; z *= MIX1; z ^= z >> S2; z *= MIX2; z ^= z >> S3, in uint64 arithmetic.
HASH_WEYL = 0x9E3779B97F4A7C15
HASH_MIX1 = 0xBF58476D1CE4E5B9
HASH_MIX2 = 0x94D049BB133111EB
HASH_SHIFTS = (30, 27, 31)
# The top 24 bits make the uniform number in [0, 1), exact in float32; kept where it is >= p.
UNIFORM_BITS = 24


def _int64(constant: int) -> int:
    # torch has int64, not uint64; two's-complement multiplication wraps alike.
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _logical_shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def keep_flags(seed: Union[int, torch.Tensor], rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """(rows, cols) bool: which elements of the logical input dropout keeps."""
    if isinstance(seed, torch.Tensor):
        device = seed.device if device is None else device
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        seed = torch.tensor(int(seed), dtype=torch.int64, device=device)  # wraps as the kernels' uint64 does
    z = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    z = z + seed * _int64(HASH_WEYL)
    z = (z ^ _logical_shift(z, HASH_SHIFTS[0])) * _int64(HASH_MIX1)
    z = (z ^ _logical_shift(z, HASH_SHIFTS[1])) * _int64(HASH_MIX2)
    z = z ^ _logical_shift(z, HASH_SHIFTS[2])
    uniform = _logical_shift(z, 64 - UNIFORM_BITS).to(torch.float32) * (1.0 / (1 << UNIFORM_BITS))
    return uniform >= float(p)


def dropout_mask(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """The multiplier dropout applies to x (any shape, last dim in_features): 0 or 1 / (1 - p)."""
    if p == 0:
        return torch.ones_like(x, memory_format=torch.contiguous_format)
    cols = x.shape[-1]
    keep = keep_flags(seed, x.numel() // max(cols, 1), cols, p, x.device).view(x.shape)
    # As the kernels do: the keep flag times 1 / (1 - p) rounded to x's compute type.
    return keep.to(x.dtype) * (1.0 / (1.0 - p))


def dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """Inverted dropout of x with the hashed mask; a new tensor even at p = 0. Multiplied in fp32
    (fp64 for fp64) and rounded once, as the kernels do."""
    if p == 0:
        return x.clone(memory_format=torch.contiguous_format)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(compute) * dropout_mask(x.to(compute), p, seed)).to(x.dtype)


def msplora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    dropout_p: float = 0.0,
    seed=None,
) -> torch.Tensor:
    """Level-by-level MSPLoRA linear; autograd derives every gradient. With dropout_p > 0 the
    adapter branch sees dropout(x) under the mask of `seed` (an int or a one-element tensor)."""
    y = torch.nn.functional.linear(x, weight, bias)
    x_lora = dropout(x, dropout_p, seed) if dropout_p > 0 else x
    for a, b, s in zip(As, Bs, scales):
        y = y + s * ((x_lora @ a) @ b)
    return y


def lora_factors(As, Bs, scales) -> tuple[torch.Tensor, torch.Tensor]:
    """The levels as one LoRA of rank R = sum of the ranks: [A_1 | ... | A_n] (in_features x R)
    and [s_1 B_1; ...; s_n B_n] (R x out_features), whose product is the dense update."""
    return torch.cat(list(As), dim=1), torch.cat([s * b for b, s in zip(Bs, scales)], dim=0)


def delta_weight(As, Bs, scales) -> torch.Tensor:
    """The dense update sum_i s_i A_i B_i, (in_features, out_features): the transpose of the
    change to an nn.Linear's weight."""
    a, b = lora_factors(As, Bs, scales)
    return a @ b


# The primitive ops of the contract (contract.py), as the "torch" backend runs them.

def shrink(x, a, p, seed):
    return (dropout(x, p, seed) if p > 0 else x) @ a


def expand_linear(x, weight, bias, t, b):
    return torch.nn.functional.linear(x, weight, bias) + t @ b


def grad_t_b(dy, t, b):
    return dy @ b.T, t.T @ dy


def grad_x(dy, weight, dt, a, p, seed):
    # Only the adapter branch saw dropout(x), so the mask applies to its term alone.
    lora = dt @ a.T
    return dy @ weight + (dropout(lora, p, seed) if p > 0 else lora)


def grad_a(x, dt, p, seed):
    return (dropout(x, p, seed) if p > 0 else x).T @ dt


def shrink_expand_linear(x, weight, bias, a, b, p, seed):
    t = shrink(x, a, p, seed)
    return expand_linear(x, weight, bias, t, b), t


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """(M, K) bool -> (M, ceil(K / 32)) int32: bit k % 32 of word k // 32 is keep[:, k] (contract.py)."""
    m, k = keep.shape
    words = -(-k // 32)
    padded = torch.zeros(m, words * 32, dtype=torch.int64, device=keep.device)
    padded[:, :k] = keep.to(torch.int64)
    weights = torch.ones(32, dtype=torch.int64, device=keep.device) << torch.arange(32, device=keep.device)
    packed = (padded.view(m, words, 32) * weights).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack_mask(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_mask: (M, W) int32 -> (M, k) bool."""
    shifts = torch.arange(32, device=bits.device)
    return ((bits.to(torch.int64)[:, :, None] >> shifts) & 1).view(bits.shape[0], -1)[:, :k].bool()


def _from_bits(t, bits, p):
    # dropout(t) with the mask the bits hold: multiplied in fp32 (fp64 for fp64), rounded once.
    compute = torch.float64 if t.dtype == torch.float64 else torch.float32
    keep = unpack_mask(bits, t.shape[1]).to(compute) * (1.0 / (1.0 - p))
    return (t.to(compute) * keep).to(t.dtype)


def _packed_keep_flags(x, p, seed):
    keep = keep_flags(seed, x.shape[0], x.shape[1], p, x.device) if p > 0 else torch.ones_like(x, dtype=torch.bool)
    return pack_mask(keep)


def shrink_keep_mask(x, a, p, seed):
    return shrink(x, a, p, seed), _packed_keep_flags(x, p, seed)


def dropout_keep_mask(x, p, seed):
    return dropout(x, p, seed), _packed_keep_flags(x, p, seed)


def grad_x_bits(dy, weight, dt, a, bits, p):
    lora = dt @ a.T
    return dy @ weight + (_from_bits(lora, bits, p) if p > 0 else lora)


def grad_a_bits(x, dt, bits, p):
    return (_from_bits(x, bits, p) if p > 0 else x).T @ dt

