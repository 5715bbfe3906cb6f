"""apply_msplora: MSPLoRA layers put into a model in place, sharing their levels.

Shared levels (a level with a group count) live once, in one container registered at the
model's root (`model.msplora_factors`); adapted layers only reference them. Per-layer levels
are owned by their layer. So model.parameters(), state_dict, DDP and FSDP2 see every
tensor once.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .base_layers import compute_dtype, hold_trainable_layout, linear_features
from .config import MSPLoraConfig, group_of
from .factors import FACTORS_ATTR, MSPLoraFactors
from .layer import LoraLevel, MSPLoraLinear
from .transformers_adapter import announce_adapter
from .targets import Site, find_sites, matches

def adapter_dtype_for(weight_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The factors' dtype on a base layer of `weight_dtype`: float32 on a float16/bfloat16 base
    when autocast_adapter_dtype (as PEFT does), so that small optimizer updates are not rounded
    away; the base's dtype otherwise. The kernels still run in the base's dtype."""
    if autocast_adapter_dtype and weight_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight_dtype


def apply_msplora(model: nn.Module, config: MSPLoraConfig, *, autocast_adapter_dtype: bool = True) -> nn.Module:
    """Replace the targeted nn.Linear layers of `model` in place with MSPLoraLinear, freeze
    everything else, and return the model. Works on models built on the meta device.
    Factors on a float16/bfloat16 base are kept in float32 unless autocast_adapter_dtype=False."""
    if not isinstance(config, MSPLoraConfig):
        raise TypeError(f"apply_msplora: config must be an MSPLoraConfig, got {type(config).__name__}")
    if hasattr(model, FACTORS_ATTR) or any(isinstance(m, MSPLoraLinear) for m in model.modules()):
        raise ValueError("apply_msplora: the model already has MSPLoRA layers; unload it first")
    sites = find_sites(model, config)
    # Layers that share a factor must agree in shape; name the first pair that does not.
    owners: dict[tuple, Site] = {}
    for site in sites:
        for level, g in enumerate(config.groups):
            if g is None:
                continue
            key = (site.target, level, group_of(site.layer, site.num_layers, g))
            first = owners.setdefault(key, site)
            shape, first_shape = linear_features(site.linear), linear_features(first.linear)
            if shape != first_shape:
                raise ValueError(f"apply_msplora: {first.path} {first_shape} and {site.path} {shape} would share level "
                                 f"{level} of target {site.target!r} but differ in shape (in, out)")
            if site.ranks[level] != first.ranks[level]:
                raise ValueError(f"apply_msplora: rank_pattern gives {first.path} rank {first.ranks[level]} and "
                                 f"{site.path} rank {site.ranks[level]} at level {level}, which they share (target "
                                 f"{site.target!r}); give every layer that shares a level one rank for it, or change "
                                 f"only the per-layer level")

    factors = MSPLoraFactors()
    factors.original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    # The modules to train in full, copied as they are before anything changes.
    factors.saved_module_paths = [path for path, _ in model.named_modules()
                                  if path and config.modules_to_save and matches(path, config.modules_to_save)]
    for path in factors.saved_module_paths:
        factors.original_modules.append(copy.deepcopy(model.get_submodule(path)).requires_grad_(False))
    # Every 4-bit layer of the model, adapted or not, keeps a layout that trains (base_layers.py).
    for path, module in model.named_modules():
        previous = hold_trainable_layout(module)
        if previous is not None:
            factors.quantized_cpu_inference[path] = previous
    for p in model.parameters():
        p.requires_grad_(False)
    for site in sites:
        w = site.linear.weight
        dtype = adapter_dtype_for(compute_dtype(site.linear), autocast_adapter_dtype)

        def make(rank, alpha, site=site, w=w, dtype=dtype):
            return lambda: LoraLevel(*linear_features(site.linear), rank, alpha, use_rslora=config.use_rslora,
                                     init_lora_weights=config.init_lora_weights, device=w.device, dtype=dtype)

        levels = [
            None if g is None else factors.get_or_create(site.target, level, group_of(site.layer, site.num_layers, g),
                                                         make(site.ranks[level], config.alphas[level]))
            for level, g in enumerate(config.groups)
        ]
        layer = MSPLoraLinear.from_linear(site.linear, ranks=site.ranks, lora_alpha=config.alphas, use_rslora=config.use_rslora,
                                          init_lora_weights=config.init_lora_weights, dropout=config.dropout,
                                          levels=levels, backend=config.backend, dtype=dtype)
        parent_path, _, attr = site.path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, layer)
        factors.layer_paths.append(site.path)
    for path in factors.saved_module_paths:
        model.get_submodule(path).requires_grad_(True)
    model.add_module(FACTORS_ATTR, factors)
    model.msplora_config = config
    announce_adapter(model, config)
    return model
