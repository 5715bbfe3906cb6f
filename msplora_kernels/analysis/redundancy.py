"""Inter-layer redundancy (paper eqs. 9-10): KL divergences between layers' normalized spectra.

The stated choice for spectra that cannot be compared as they are:
- Unequal lengths: the shorter spectra are padded with zeros to the longest length.
- Zeros: EPS is added to every entry before normalizing, so p is strictly positive and every
  divergence is finite (an all-zero spectrum becomes uniform). Never NaN.
"""
from __future__ import annotations

import torch

EPS = 1e-10


def normalize(sigmas: list[torch.Tensor]) -> torch.Tensor:
    """Stack spectra (padded with zeros to one length) into rows of probabilities."""
    n = max(len(s) for s in sigmas)
    rows = torch.zeros(len(sigmas), n, dtype=torch.float64)
    for i, s in enumerate(sigmas):
        rows[i, : len(s)] = s.double()
    rows = rows + EPS
    return rows / rows.sum(dim=1, keepdim=True)


def kl_matrix(sigmas: list[torch.Tensor]) -> torch.Tensor:
    """D[i, j] = KL(p_i || p_j) = sum_k p_i[k] log(p_i[k] / p_j[k])."""
    p = normalize(sigmas)
    logp = p.log()
    return (p[:, None, :] * (logp[:, None, :] - logp[None, :, :])).sum(-1)
