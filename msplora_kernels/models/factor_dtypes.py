"""Factors keep the dtype they were given, whatever a trainer casts behind the module's back.

TRL's trainers cast every trainable parameter of a quantized model to bfloat16 by assigning
`param.data` (a QLoRA habit), which nn.Module never sees. MSPLoRA keeps its factors in the dtype
apply_msplora chose (float32 on a 16-bit base, so that small optimizer updates are not rounded
away) or the one the user converted the module to; LoraLevel records it (factor_dtype, updated by
its _apply), and restore_factor_dtypes puts such factors back. Call it before the optimizer's first
step: optimizer state is made at that step, in the parameter's dtype then.
"""
from __future__ import annotations

from torch import nn

from .full_tensors import is_sharded
from .layer import LoraLevel


def restore_factor_dtypes(model: nn.Module) -> list[str]:
    """Cast back every factor whose dtype is not its level's factor_dtype; returns their names.
    Sharded factors (ZeRO-3, FSDP2) are the engine's to cast and are left alone."""
    restored = []
    for prefix, level in model.named_modules():
        if not isinstance(level, LoraLevel):
            continue
        for name in ("A", "B"):
            p = getattr(level, name)
            if p.dtype != level.factor_dtype and not is_sharded(p):
                p.data = p.data.to(level.factor_dtype)
                restored.append(f"{prefix}.{name}")
    return restored
