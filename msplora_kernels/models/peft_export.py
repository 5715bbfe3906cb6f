"""Exact export of an MSPLoRA adapter as a standard PEFT LoRA adapter.

Per layer, sum_i s_i A_i B_i = [A_1 | ... | A_L] [s_1 B_1; ...; s_L B_L] is exactly a LoRA of
rank R = sum(ranks). Written with r = lora_alpha = R (scaling 1), it loads in PEFT, and in
every serving stack that takes PEFT LoRA adapters (vLLM needs --max-lora-rank >= R).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .._extras import require
from ..ops.reference import lora_factors
from .config import WEIGHTS_NAME
from .full_tensors import expected_shapes, whole_copies
from .factors import adapted_layers, require_adapter, saved_modules
from .layer import LoraLevel


def peft_lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """lora_A (R x in) and lora_B (out x R) per adapted layer, under PEFT's saved names, from whole
    copies of the factors (gathered where an engine shards them: call it on every rank there)."""
    from .adapter_io import adapter_state_dict

    named = adapter_state_dict(model)
    whole = whole_copies(named, expected_shapes(model, named), "export_peft")
    level_names = {id(module): prefix for prefix, module in model.named_modules() if isinstance(module, LoraLevel)}
    out = {}
    with torch.no_grad():
        for path, layer in adapted_layers(model):
            names = [level_names[id(lvl)] for lvl in layer.levels]
            a, b = lora_factors([whole[f"{n}.A"] for n in names], [whole[f"{n}.B"] for n in names], layer.scales)
            out[f"base_model.model.{path}.lora_A.weight"] = a.T.contiguous()
            out[f"base_model.model.{path}.lora_B.weight"] = b.T.contiguous()
        for path, module in saved_modules(model):
            for name, _ in module.named_parameters():
                out[f"base_model.model.{path}.{name}"] = whole[f"{path}.{name}"].contiguous()
    return out


def export_peft(model: nn.Module, directory, base_model_name_or_path: str | None = None) -> int:
    """Write a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors); returns its rank R
    (the largest, where rank_pattern gives layers different ranks)."""
    peft = require("peft", "export_peft")
    from safetensors.torch import save_file

    config = require_adapter(model, "export_peft")
    layers = adapted_layers(model)
    if any(layer.merged for _, layer in layers):
        raise ValueError("export_peft: some layers are merged; unmerge_adapter(model) first, or the export would count the update twice")
    rank = sum(config.ranks)
    # Layers that rank_pattern gave other ranks: their own R, and alpha = R to keep the scaling 1.
    # Keys are escaped paths, which PEFT matches as regexes against each layer's path.
    other = {re.escape(path): sum(layer.ranks) for path, layer in layers if sum(layer.ranks) != rank}
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=other,
        alpha_pattern=dict(other),
        target_modules=[path for path, _ in layers],
        lora_dropout=config.dropout,
        fan_in_fan_out=any(layer.fan_in_fan_out for _, layer in layers),  # Conv1D bases (GPT-2)
        bias="none",
        modules_to_save=list(config.modules_to_save) or None,
        base_model_name_or_path=base_model_name_or_path,
    )
    largest = max([rank, *other.values()])
    tensors = peft_lora_tensors(model)  # on every rank: a sharded factor is gathered by all of them
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return largest
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(directory))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return largest
