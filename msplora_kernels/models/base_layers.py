"""The base layers MSPLoRA wraps: torch's nn.Linear and transformers' Conv1D (GPT-2 and kin)."""
from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer that stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a transformers Conv1D."""
    return (module.nx, module.nf) if is_conv1d(module) else (module.in_features, module.out_features)


def require_float_weight(module: nn.Module, who: str, name: str) -> None:
    """Refuse a base layer whose weight is not floating point (a quantized layer), before any change."""
    weight = module.weight
    if not weight.is_floating_point():
        raise TypeError(
            f"{who}: {name} ({type(module).__name__}) has a {weight.dtype} weight of shape {tuple(weight.shape)}; "
            "MSPLoRA needs a floating-point base layer (quantized ones, such as bitsandbytes', are not supported)"
        )
