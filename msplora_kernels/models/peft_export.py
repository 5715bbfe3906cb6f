"""Exact export of an MSPLoRA adapter as a standard PEFT LoRA adapter.

Per layer, sum_i s_i A_i B_i = [A_1 | ... | A_L] [s_1 B_1; ...; s_L B_L] is exactly a LoRA of
rank R = sum(ranks). Written with r = lora_alpha = R (scaling 1), it loads in PEFT, and in
every serving stack that takes PEFT LoRA adapters (vLLM needs --max-lora-rank >= R).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .._extras import require
from ..ops.reference import lora_factors
from .config import WEIGHTS_NAME
from .adapter_tensors import adapter_entries
from .factors import adapter_named, layers_with, refuse_merged, saved_modules
from .full_tensors import whole_copies


def peft_lora_tensors(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """lora_A (R x in) and lora_B (out x R) per adapted layer, under PEFT's saved names, from whole
    copies of one adapter's factors (gathered where an engine shards them: call it on every rank
    there)."""
    name = adapter_named(model, "export_peft", adapter_name)
    entries = adapter_entries(model, name, "export_peft")
    whole = whole_copies({e.file_key: e.tensor for e in entries}, {e.file_key: e.shape for e in entries}, "export_peft")
    file_key = {id(e.tensor): e.file_key for e in entries}
    out = {}
    with torch.no_grad():
        for path, levels in layers_with(model, name):
            a, b = lora_factors([whole[file_key[id(lvl.A)]] for lvl in levels],
                                [whole[file_key[id(lvl.B)]] for lvl in levels], [lvl.scale for lvl in levels])
            out[f"base_model.model.{path}.lora_A.weight"] = a.T.contiguous()
            out[f"base_model.model.{path}.lora_B.weight"] = b.T.contiguous()
        if model.msplora_factors.configs[name].modules_to_save:
            for path, module in saved_modules(model):
                for pname, _ in module.named_parameters():
                    out[f"base_model.model.{path}.{pname}"] = whole[f"{path}.{pname}"].contiguous()
    return out


def export_peft(model: nn.Module, directory, base_model_name_or_path: str | None = None,
                adapter_name: Optional[str] = None) -> int:
    """Write one adapter (the active one unless named) as a PEFT LoRA adapter (adapter_config.json,
    adapter_model.safetensors); returns its rank R (the largest, where rank_pattern gives layers
    different ranks)."""
    peft = require("peft", "export_peft")
    from safetensors.torch import save_file

    name = adapter_named(model, "export_peft", adapter_name)
    config = model.msplora_factors.configs[name]
    refuse_merged(model, "export_peft", ", which the export would count twice")
    layers = layers_with(model, name)
    rank = sum(config.ranks)
    # Layers that rank_pattern gave other ranks: their own R, and alpha = R to keep the scaling 1.
    # Keys are escaped paths, which PEFT matches as regexes against each layer's path.
    other = {re.escape(path): sum(lvl.rank for lvl in levels) for path, levels in layers
             if sum(lvl.rank for lvl in levels) != rank}
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=other,
        alpha_pattern=dict(other),
        target_modules=[path for path, _ in layers],
        lora_dropout=config.dropout,
        fan_in_fan_out=any(model.get_submodule(path).fan_in_fan_out for path, _ in layers),  # Conv1D bases (GPT-2)
        bias="none",
        modules_to_save=list(config.modules_to_save) or None,
        base_model_name_or_path=base_model_name_or_path,
    )
    largest = max([rank, *other.values()])
    tensors = peft_lora_tensors(model, name)  # on every rank: a sharded factor is gathered by all of them
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return largest
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(directory))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return largest
