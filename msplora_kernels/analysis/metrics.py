"""The numbers of an adapter's analysis, as one JSON-ready dict."""
from __future__ import annotations

import torch

from .redundancy import kl_matrix
from .spectra import FactorPair, effective_rank_space, entropy_effective_rank, lora_layer_spectra


def _factor_entry(pair: FactorPair, sigma: torch.Tensor, top_k: int) -> dict:
    return {
        "name": pair.name, "target": pair.target, "level": pair.level, "group": pair.group, "layer": pair.layer,
        "rank": pair.a.shape[1],
        "top_singular_values": sigma[:top_k].tolist(),
        "effective_rank_space": effective_rank_space(sigma),
        "entropy_effective_rank": entropy_effective_rank(sigma),
    }


def _layer_specific(pairs: list[FactorPair], level: int) -> dict[str, dict[int, torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {}
    for p in pairs:
        if p.level == level and p.layer is not None:
            out.setdefault(p.target, {})[p.layer] = p.singular_values()
    return out


def _kl_by_target(spectra: dict[str, dict[int, torch.Tensor]]) -> dict[str, dict]:
    out = {}
    for target, by_layer in sorted(spectra.items()):
        layers = sorted(by_layer)
        out[target] = {"layers": layers, "kl": kl_matrix([by_layer[i] for i in layers]).tolist()}
    return out


def analyze(pairs: list[FactorPair], config, lora_dir=None, top_k: int = 8) -> dict:
    """Effective rank per factor and per level; the layer-specific KL matrix per target; with a
    PEFT LoRA adapter, its KL matrix and the difference MSPLoRA minus LoRA (paper Fig. 4)."""
    factors = [_factor_entry(p, p.singular_values(), top_k) for p in pairs]
    levels = []
    for level in range(config.num_levels):
        rows = [f for f in factors if f["level"] == level]
        eranks = [f["entropy_effective_rank"] for f in rows]
        ranks = sorted({f["rank"] for f in rows}) or [config.ranks[level]]
        # Curves of different lengths (rank_pattern) have no mean; the normalized rank still does.
        mean_space = torch.tensor([f["effective_rank_space"] for f in rows]).mean(0).tolist() if rows and len(ranks) == 1 else []
        levels.append({
            "level": level, "rank": ranks[0] if len(ranks) == 1 else ranks, "groups": config.groups[level],
            "factor_pairs": len(rows),
            "mean_entropy_effective_rank": sum(eranks) / len(eranks) if eranks else None,
            "mean_entropy_effective_rank_over_rank": sum(f["entropy_effective_rank"] / f["rank"] for f in rows) / len(rows)
            if rows else None,
            "mean_effective_rank_space": mean_space,
        })
    last = len(config.ranks) - 1
    result = {"config": config.to_dict(), "levels": levels, "factors": factors,
              "layer_kl": _kl_by_target(_layer_specific(pairs, last))}
    if lora_dir is not None:
        lora = _kl_by_target(lora_layer_spectra(lora_dir))
        result["lora_layer_kl"] = lora
        diff = {}
        for target, ours in result["layer_kl"].items():
            theirs = lora.get(target)
            if theirs is None or theirs["layers"] != ours["layers"]:
                continue
            d = torch.tensor(ours["kl"]) - torch.tensor(theirs["kl"])
            diff[target] = {"layers": ours["layers"], "kl_difference": d.tolist(), "mean": float(d.mean())}
        result["kl_difference"] = diff
    return result
