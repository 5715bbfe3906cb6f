"""apply_msplora: MSPLoRA layers put into a model in place, sharing their levels.

Shared levels (a level with a group count) live once, in one container registered at the
model's root (`model.msplora_factors`); adapted layers only reference them. Per-layer levels
are owned by their layer. So model.parameters(), state_dict, DDP and FSDP2 see every
tensor once.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .base_layers import compute_dtype, hold_trainable_layout, linear_features
from .config import MSPLoraConfig, group_of
from .factors import FACTORS_ATTR, MSPLoraFactors, adapted_layers, refuse_merged, replace_module
from .layer import DEFAULT_ADAPTER, LoraLevel, MSPLoraLinear
from .transformers_adapter import announce_adapter
from .targets import Site, find_sites, matches

def adapter_dtype_for(weight_dtype: torch.dtype, autocast_adapter_dtype: bool) -> torch.dtype:
    """The factors' dtype on a base layer of `weight_dtype`: float32 on a float16/bfloat16 base
    when autocast_adapter_dtype (as PEFT does), so that small optimizer updates are not rounded
    away; the base's dtype otherwise. The kernels still run in the base's dtype."""
    if autocast_adapter_dtype and weight_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return weight_dtype


_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def check_adapter_name(name, who: str) -> None:
    # A name becomes part of module names (own_levels keys, adapters[name]): no dots.
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(f"{who}: adapter_name must be a name of letters, digits, '_' and '-' that starts with a "
                         f"letter or '_', got {name!r}")


def apply_msplora(model: nn.Module, config: MSPLoraConfig, *, autocast_adapter_dtype: bool = True,
                  adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Replace the targeted nn.Linear layers of `model` in place with MSPLoraLinear, freeze
    everything else, and return the model. Works on models built on the meta device.
    Factors on a float16/bfloat16 base are kept in float32 unless autocast_adapter_dtype=False.

    On a model that has adapters already, this adds one more, named `adapter_name`, with its own
    config and its own shared levels; it stays inactive (and frozen) until set_adapter names it,
    as PEFT's add_adapter does."""
    if not isinstance(config, MSPLoraConfig):
        raise TypeError(f"apply_msplora: config must be an MSPLoraConfig, got {type(config).__name__}")
    check_adapter_name(adapter_name, "apply_msplora")
    existing = getattr(model, FACTORS_ATTR, None)
    if existing is None and any(isinstance(m, MSPLoraLinear) for m in model.modules()):
        raise ValueError("apply_msplora: the model already has MSPLoRA layers; unload it first")
    if existing is not None:
        _check_another_adapter(model, existing, config, adapter_name)
    sites = find_sites(model, config)
    _check_sharing(sites, config)
    _check_one_device(sites)

    if existing is None:
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
    else:
        factors = existing
    shared = factors.shared_levels(adapter_name)
    for site in sites:
        current = model.get_submodule(site.path)
        base = current.to_linear() if isinstance(current, MSPLoraLinear) else site.linear
        dtype = adapter_dtype_for(compute_dtype(base), autocast_adapter_dtype)
        device = (base.weight if base.weight is not None else next(base.parameters())).device

        def make(rank, alpha, base=base, device=device, dtype=dtype):
            return lambda: LoraLevel(*linear_features(base), rank, alpha, use_rslora=config.use_rslora,
                                     init_lora_weights=config.init_lora_weights, device=device, dtype=dtype)

        levels = [
            None if g is None else shared.get_or_create(site.target, level, group_of(site.layer, site.num_layers, g),
                                                        make(site.ranks[level], config.alphas[level]))
            for level, g in enumerate(config.groups)
        ]
        if isinstance(current, MSPLoraLinear):
            current.add_adapter(adapter_name, ranks=site.ranks, lora_alpha=config.alphas, use_rslora=config.use_rslora,
                                levels=levels, dropout=config.dropout, device=device, dtype=dtype)
            continue
        layer = MSPLoraLinear.from_linear(site.linear, ranks=site.ranks, lora_alpha=config.alphas,
                                          use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                                          dropout=config.dropout, levels=levels, backend=config.backend, dtype=dtype,
                                          adapter_name=adapter_name)
        replace_module(model, site.path, layer)
        factors.layer_paths.append(site.path)
    for path in factors.saved_module_paths:
        model.get_submodule(path).requires_grad_(True)
    if existing is None:
        model.add_module(FACTORS_ATTR, factors)
    factors.configs[adapter_name] = config
    activate(model, factors.active or (adapter_name,))
    return model


def activate(model: nn.Module, names: tuple) -> None:
    """Make the adapters `names` the active ones in every layer: they compute and train, and the
    others are frozen."""
    factors = getattr(model, FACTORS_ATTR)
    for _, layer in adapted_layers(model):
        layer.set_active(names)
        for name, levels in layer.adapter_levels.items():
            for lvl in levels:  # a shared level is met once per layer that reads it: the flag is the same
                lvl.requires_grad_(name in names)
    factors.active = tuple(names)
    model.msplora_config = factors.configs[names[0]]
    announce_adapter(model, factors)


def _check_another_adapter(model: nn.Module, factors: MSPLoraFactors, config: MSPLoraConfig, name: str) -> None:
    if name in factors.configs:
        raise ValueError(f"apply_msplora: the model already has an adapter named {name!r} (it has "
                         f"{list(factors.configs)}); pick another adapter_name, or delete_adapter it first")
    if config.modules_to_save or any(c.modules_to_save for c in factors.configs.values()):
        raise ValueError("apply_msplora: modules_to_save with several adapters on one model is not supported yet "
                         "(each adapter would need its own trained copy); give the adapters no modules_to_save, or "
                         "use one adapter per model")
    refuse_merged(model, "apply_msplora")


def _check_one_device(sites: list[Site]) -> None:
    """Shared levels live once, on one device, and every layer that shares one reads it in its
    forward; a model spread over several devices (device_map="auto", layers moved by hand) would
    have layers read factors on another device. Refused until the factors are placed per device."""
    by_device: dict[str, list[str]] = {}
    for site in sites:
        weight = site.linear.weight if site.linear.weight is not None else next(site.linear.parameters())
        by_device.setdefault(str(weight.device), []).append(site.path)
    if len(by_device) > 1:
        where = "; ".join(f"{device}: {len(paths)} layers, e.g. {paths[0]}" for device, paths in by_device.items())
        raise ValueError(f"apply_msplora: the targeted layers sit on several devices ({where}). Shared levels live "
                         "once, on one device, and every layer that shares them reads them in its forward, so a model "
                         "spread over devices (device_map across GPUs) is not supported yet: load it on one device, "
                         "or shard it with FSDP2 or DeepSpeed ZeRO-3 (docs/distributed.md)")


def _check_sharing(sites: list[Site], config: MSPLoraConfig) -> None:
    """Layers that share a factor must agree in shape and rank; name the first pair that does not."""
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
