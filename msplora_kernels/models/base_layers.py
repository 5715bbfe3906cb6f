"""The base layers MSPLoRA wraps: torch's nn.Linear, transformers' Conv1D (GPT-2 and kin), and
bitsandbytes' quantized linear layers (Linear4bit: nf4 or fp4, Linear8bitLt), whose weight stays
quantized and frozen and whose own forward computes x W^T + b."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

QUANTIZED_SUPPORTED = "bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer that stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def quantized_kind(module: nn.Module) -> Optional[str]:
    """'4bit' or '8bit' for a bitsandbytes quantized linear layer, None for any other module."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes.") and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return "4bit" if cls.__name__ == "Linear4bit" else "8bit"
    return None


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a quantized linear or a transformers Conv1D."""
    return (module.nx, module.nf) if is_conv1d(module) else (module.in_features, module.out_features)


def check_base_weight(module: nn.Module, who: str, name: str) -> None:
    """Refuse a base layer whose weight is neither floating point nor a supported quantized one,
    before any change."""
    weight = module.weight
    if weight.is_floating_point() or quantized_kind(module) is not None:
        return
    raise TypeError(
        f"{who}: {name} ({type(module).__module__}.{type(module).__name__}) has a {weight.dtype} weight of shape "
        f"{tuple(weight.shape)}; MSPLoRA takes floating-point base layers and {QUANTIZED_SUPPORTED}, not this "
        "quantized layer type"
    )


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a base layer computes in: its weight's, or a quantized layer's compute dtype
    (float32 where bitsandbytes leaves it to the input's)."""
    if quantized_kind(module) is None:
        return module.weight.dtype
    return getattr(module, "compute_dtype", None) or torch.float32


def hold_trainable_layout(module: nn.Module) -> Optional[bool]:
    """Keep a 4-bit layer's weight in the layout that trains; returns the setting to restore, or
    None where there is none. On CPUs with AVX512-BF16, bitsandbytes converts a 4-bit weight to an
    inference-only layout the first time the layer runs in eval mode on an input that needs no
    gradient, and after that a forward that needs gradients fails (as after a Trainer evaluation
    step); here that conversion is turned off, and a weight already converted is converted back."""
    if quantized_kind(module) != "4bit" or not hasattr(module, "support_avx512bf16_for_cpu"):
        return None
    previous = module.support_avx512bf16_for_cpu
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return previous


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A quantized layer's weight as floats, (out_features, in_features)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if quantized_kind(module) == "4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnbf.int8_vectorwise_dequant(weight.data, scb).to(torch.float32)


def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace a quantized layer's weight by `weight` (floats, (out, in)) quantized as before. It adds
    the quantization's rounding, as PEFT's merge into bitsandbytes layers does; say so once."""
    import bitsandbytes as bnb

    warnings.warn("msplora_kernels: merging into a quantized layer re-quantizes its weight, which adds rounding "
                  "error: outputs differ slightly from the unmerged adapter's", UserWarning, stacklevel=3)
    old, device = module.weight, module.weight.device
    if quantized_kind(module) == "4bit":
        new = bnb.nn.Params4bit(weight.to("cpu", old.quant_state.dtype), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=module)
    else:
        new = bnb.nn.Int8Params(weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False)
        module.state.reset_grads() if hasattr(module.state, "reset_grads") else None
        module.state.CB = module.state.SCB = None
    module.weight = new.to(device)
