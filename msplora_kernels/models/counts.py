"""Trainable-parameter counts of an adapted model, per level and against LoRA."""
from __future__ import annotations

from torch import nn

from typing import Optional

from .factors import adapter_named, layers_with


def summary(model: nn.Module, adapter_name: Optional[str] = None) -> dict:
    """One adapter's parameters (the active one unless named) per level and in total, next to
    LoRA's count for the same layers at the global rank (what the paper compares against; each
    layer's own, under rank_pattern), and the model's trainable parameters."""
    name = adapter_named(model, "summary", adapter_name)
    config = model.msplora_factors.configs[name]
    layers = layers_with(model, name)
    per_level = []
    for level in range(config.num_levels):
        unique = {id(levels[level]): levels[level] for _, levels in layers}
        ranks = sorted({lvl.rank for lvl in unique.values()})
        per_level.append({
            "level": level,
            "rank": ranks[0] if len(ranks) == 1 else ranks,  # a list where rank_pattern varies it
            "groups": config.groups[level] if config.groups[level] is not None else "per layer",
            "factor_pairs": len(unique),
            "params": sum(lvl.A.numel() + lvl.B.numel() for lvl in unique.values()),
        })
    total = sum(row["params"] for row in per_level)
    lora = sum(levels[0].rank * (levels[0].in_features + levels[0].out_features) for _, levels in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # A 4-bit weight packs two values in a byte; count values, as PEFT does.
    every = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return {"levels": per_level, "total": total, "lora_rank": per_level[0]["rank"], "lora_equivalent": lora,
            "adapted_layers": len(layers), "trainable": trainable, "all_params": every}


def print_trainable_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    s = summary(model, adapter_name)
    print(f"trainable params: {s['trainable']:,} || all params: {s['all_params']:,} || "
          f"trainable%: {100 * s['trainable'] / max(s['all_params'], 1):.4f}")
    for row in s["levels"]:
        print(f"  level {row['level']}: rank {row['rank']!s:>3}, groups {row['groups']!s:>9}, "
              f"{row['factor_pairs']:>4} factor pairs, {row['params']:,} params")
    print(f"  MSPLoRA total {s['total']:,} vs LoRA r={s['lora_rank']} on the same {s['adapted_layers']} layers "
          f"{s['lora_equivalent']:,} ({s['total'] / s['lora_equivalent']:.3f}x)")
