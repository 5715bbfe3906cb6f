"""Several adapters on one model: which are active, switching, deleting, and combining them.

Each adapter has its own config, its own shared levels and its own per-layer levels (factors.py,
layer.py). The active adapters compute, their updates added, and train; the others are frozen and
cost nothing in a forward: a layer computes with the active adapters' levels alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence, Union

import torch
from torch import nn

from .factors import (FACTORS_ATTR, adapted_layers, adapter_named, layers_with, refuse_merged, replace_module,
                      require_adapter)
from .inject import activate, apply_msplora, check_adapter_name


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters."""
    require_adapter(model, "active_adapters")
    return list(getattr(model, FACTORS_ATTR).active)


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter of the model, in the order they were added."""
    require_adapter(model, "adapter_names")
    return list(getattr(model, FACTORS_ATTR).configs)


def set_adapter(model: nn.Module, names: Union[str, Sequence[str]]) -> None:
    """Make `names` (one name, or several whose updates add) the active adapters: they compute
    and train (requires_grad), every other adapter is frozen and left out of the forward."""
    require_adapter(model, "set_adapter")
    factors = getattr(model, FACTORS_ATTR)
    names = (names,) if isinstance(names, str) else tuple(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"set_adapter: names must name one adapter or several distinct ones, got {list(names)}")
    for name in names:
        adapter_named(model, "set_adapter", name)
    dropouts = {factors.configs[n].dropout for n in names}
    if len(dropouts) > 1:
        raise ValueError(f"set_adapter: adapters {list(names)} differ in dropout ({sorted(dropouts)}); adapters active "
                         "together share one dropout mask per layer")
    refuse_merged(model, "set_adapter")
    activate(model, names)


@contextlib.contextmanager
def using_adapter(model: nn.Module, names: Union[str, Sequence[str]]):
    """Within the block the adapters `names` are the active ones; the ones active before come back
    after it (their requires_grad flags too)."""
    before = active_adapters(model)
    set_adapter(model, names)
    try:
        yield model
    finally:
        set_adapter(model, before)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the adapter `name`: its levels leave every layer and the model (no tensor of it stays
    referenced by the model), layers it alone adapted become plain layers again. The active adapter
    cannot be deleted while it is the only one active: set another one active first (or unload the
    model to remove every adapter)."""
    adapter_named(model, "delete_adapter", name)
    factors = getattr(model, FACTORS_ATTR)
    if len(factors.configs) == 1:
        raise ValueError(f"delete_adapter: {name!r} is the model's only adapter; mk.unload(model) removes it")
    if factors.active == (name,):
        others = [n for n in factors.configs if n != name]
        raise ValueError(f"delete_adapter: {name!r} is the active adapter; set_adapter(model, ...) to another one "
                         f"({others}) first")
    refuse_merged(model, "delete_adapter")
    for path, layer in adapted_layers(model):
        if name not in layer.adapter_levels:
            continue
        layer.remove_adapter(name)
        if not layer.adapter_levels:
            replace_module(model, path, layer.to_linear())
            factors.layer_paths.remove(path)
    factors.drop_shared_levels(name)
    del factors.configs[name]
    activate(model, tuple(n for n in factors.active if n != name))


def add_weighted_adapter(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
    """A new adapter whose update is exactly sum_k weights[k] * (the update of adapter names[k]), as
    PEFT's combination_type="cat": each level's factors are joined, A side by side and B stacked with
    each adapter's weight and scale folded in, so the new level's rank is the sum of theirs and its
    scale is 1. The adapters must adapt the same layers with the same pyramid (targets, groups,
    layers). The new adapter is added inactive."""
    require_adapter(model, "add_weighted_adapter")
    check_adapter_name(new_name, "add_weighted_adapter")
    names = list(names)
    if not names or len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: give one weight per adapter, got {len(names)} names and "
                         f"{len(weights)} weights")
    configs = [getattr(model, FACTORS_ATTR).configs[adapter_named(model, "add_weighted_adapter", n)] for n in names]
    first = configs[0]
    for name, config in zip(names[1:], configs[1:]):
        differs = [f for f in ("target_modules", "groups", "layers_to_transform", "layers_pattern")
                   if getattr(config, f) != getattr(first, f)]
        if differs or config.rank_pattern or first.rank_pattern:
            raise ValueError(f"add_weighted_adapter: adapters {names[0]!r} and {name!r} differ in "
                             f"{differs or ['rank_pattern']}; adapters combine only where they adapt the same layers "
                             f"with the same pyramid")
    ranks = tuple(sum(c.ranks[level] for c in configs) for level in range(len(first.ranks)))
    combined = dataclasses.replace(first, ranks=ranks, lora_alpha=list(ranks), use_rslora=False, init_lora_weights=True,
                                   dropout=first.dropout)
    apply_msplora(model, combined, adapter_name=new_name)  # inactive, and frozen, as any added adapter
    joined = set()  # a shared level is met at every layer that reads it: join it once
    with torch.no_grad():
        for path, levels in layers_with(model, new_name):
            layer = model.get_submodule(path)
            for level, new in enumerate(levels):
                if id(new) in joined:
                    continue
                joined.add(id(new))
                sources = [layer.adapter_levels[n][level] for n in names]
                new.A.copy_(torch.cat([s.A.to(new.A.dtype) for s in sources], dim=1))
                new.B.copy_(torch.cat([(w * s.scale * s.B.double()).to(new.B.dtype) for w, s in zip(weights, sources)]))

