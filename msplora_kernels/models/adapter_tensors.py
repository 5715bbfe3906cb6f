"""The tensors an adapter consists of, by the names its files use, and the whole copies of them
that every writer saves.

An adapter's file names are those it has in a model that holds it alone: its shared levels under
`msplora_factors.targets...`, its per-layer levels under `<layer>.own_levels.<i>`, and the
parameters of modules_to_save. In a model that holds several adapters, an adapter other than
"default" sits under other names (factors.py, layer.own_level_key); adapter_entries maps between
the two, so a file saved from a model with three adapters loads into a fresh base alone.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .factors import FACTORS_ATTR, adapted_layers, adapter_named, saved_modules, shared_key
from .full_tensors import whole_copies
from .layer import DEFAULT_ADAPTER, LoraLevel, own_level_key


@dataclasses.dataclass(frozen=True)
class Entry:
    file_key: str  # the name in the adapter's files
    model_key: str  # the name in the model's state_dict
    tensor: torch.Tensor
    shape: tuple  # its whole shape (a sharded tensor's local one may be smaller)


def _level_entries(file_prefix: str, model_prefix: str, lvl: LoraLevel) -> list[Entry]:
    return [Entry(f"{file_prefix}.A", f"{model_prefix}.A", lvl.A, (lvl.in_features, lvl.rank)),
            Entry(f"{file_prefix}.B", f"{model_prefix}.B", lvl.B, (lvl.rank, lvl.out_features))]


def adapter_entries(model: nn.Module, adapter_name: Optional[str] = None, who: str = "adapter_state_dict") -> list[Entry]:
    """Every tensor of one adapter (the active one where adapter_name is None), once."""
    name = adapter_named(model, who, adapter_name)
    factors = getattr(model, FACTORS_ATTR)
    entries = []
    shared = factors.shared_levels(name, create=False)
    model_root = FACTORS_ATTR if name == DEFAULT_ADAPTER else f"{FACTORS_ATTR}.adapters.{shared_key(name)}"
    if shared is not None:
        for target, levels in shared.targets.items():
            for level, groups in levels.items():
                for group, lvl in groups.items():
                    where = f"targets.{target}.{level}.{group}"
                    entries += _level_entries(f"{FACTORS_ATTR}.{where}", f"{model_root}.{where}", lvl)
    for path, layer in adapted_layers(model):
        for i, lvl in enumerate(layer.adapter_levels.get(name, ())):
            key = own_level_key(name, i)
            if key in layer.own_levels and layer.own_levels[key] is lvl:
                entries += _level_entries(f"{path}.own_levels.{i}", f"{path}.own_levels.{key}", lvl)
    if factors.configs[name].modules_to_save:
        for path, module in saved_modules(model):
            for pname, p in module.named_parameters():
                entries.append(Entry(f"{path}.{pname}", f"{path}.{pname}", p, tuple(getattr(p, "ds_shape", p.shape))))
    return entries


def adapter_state_dict(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter (the active one unless named) once, by its name in the adapter's
    files: the levels' factors and the parameters of modules_to_save."""
    return {e.file_key: e.tensor for e in adapter_entries(model, adapter_name)}


def tensors_to_write(model: nn.Module, who: str, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Whole copies of one adapter's tensors by file name, gathered where an engine shards them
    (every rank must call); refuses when one is on the meta device or still not whole, so no writer
    ever saves a short adapter."""
    entries = adapter_entries(model, adapter_name, who)
    meta = [e.file_key for e in entries if e.tensor.is_meta]
    if meta:
        raise ValueError(f"{who}: {len(meta)} adapter tensors are on the meta device (e.g. {meta[0]}); "
                         "materialize the model first")
    return whole_copies({e.file_key: e.tensor for e in entries}, {e.file_key: e.shape for e in entries}, who)
