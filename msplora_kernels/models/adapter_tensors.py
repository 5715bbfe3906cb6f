"""The tensors an adapter consists of, and the whole copies of them that every writer saves."""
from __future__ import annotations

import torch
from torch import nn

from .factors import saved_modules
from .full_tensors import expected_shapes, whole_copies
from .layer import LoraLevel


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor once, by its name in the model: the levels' factors and the
    parameters of modules_to_save."""
    out = {}
    for prefix, module in model.named_modules():  # named_modules skips repeats
        if isinstance(module, LoraLevel):
            out[f"{prefix}.A"] = module.A
            out[f"{prefix}.B"] = module.B
    for path, module in saved_modules(model):
        for name, p in module.named_parameters():
            out[f"{path}.{name}"] = p
    return out


def tensors_to_write(model: nn.Module, who: str) -> dict[str, torch.Tensor]:
    """Whole copies of the adapter's tensors, gathered where an engine shards them (every rank
    must call); refuses when one is on the meta device or still not whole, so no writer ever
    saves a short adapter."""
    tensors = adapter_state_dict(model)
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise ValueError(f"{who}: {len(meta)} adapter tensors are on the meta device (e.g. {meta[0]}); "
                         "materialize the model first")
    return whole_copies(tensors, expected_shapes(model, tensors), who)
