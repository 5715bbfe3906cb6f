"""Merge, unmerge, disable and remove an adapter, as PEFT's calls of the same names do."""
from __future__ import annotations

import contextlib

from torch import nn

from .full_tensors import is_sharded
from .adapters import set_adapter
from .transformers_adapter import withdraw_adapter
from .factors import FACTORS_ATTR, adapted_layers, replace_module, require_adapter


def _refuse_sharded(model: nn.Module, who: str) -> None:
    # A merge writes into the base weights: under ZeRO-3 or FSDP2 a rank holds a partition of each
    # (or nothing), and what it would write is not the merged weight.
    sharded = [path for path, layer in adapted_layers(model)
               if any(is_sharded(p) for p in (layer.weight, *[t for lvl in layer.levels for t in (lvl.A, lvl.B)]))]
    if sharded:
        raise ValueError(f"{who}: {len(sharded)} adapted layer(s) have sharded parameters (DeepSpeed ZeRO-3 or FSDP2), "
                         f"e.g. {sharded[0]}; a merge there would write into one rank's partition. Save the adapter "
                         "(save_adapter, on every rank) and merge it into a whole model: "
                         "mk.merge_and_unload(mk.load_msplora(base_model, path))")


def _check_merge_finite(model: nn.Module, who: str) -> None:
    # Every layer first, so that a refused merge has merged nothing.
    bad = [path for path, layer in adapted_layers(model) if not layer.merged and not layer.merge_is_finite()]
    if bad:
        raise ValueError(f"{who}: merging would put NaN or inf into {len(bad)} layer(s): "
                         f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; nothing was merged")


def merge_adapter(model: nn.Module, safe_merge: bool = False, adapter_names=None) -> None:
    """Fold the active adapters into their base weights in place (inference at nn.Linear speed);
    adapter_names (one name or several) makes those the active ones first, as set_adapter does.
    safe_merge, as in PEFT: check every merged weight is finite first, and merge nothing if not."""
    require_adapter(model, "merge_adapter")
    if adapter_names is not None:
        set_adapter(model, adapter_names)
    _refuse_sharded(model, "merge_adapter")
    if safe_merge:
        _check_merge_finite(model, "merge_adapter")
    for _, layer in adapted_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    require_adapter(model, "unmerge_adapter")
    for _, layer in adapted_layers(model):
        layer.unmerge()


def _swap_saved_modules(model: nn.Module) -> None:
    """Exchange each module in modules_to_save with the copy kept in the factors container: the
    trained one for the original, or back."""
    factors = getattr(model, FACTORS_ATTR)
    for i, path in enumerate(factors.saved_module_paths):
        factors.original_modules[i] = replace_module(model, path, factors.original_modules[i])


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base outputs exactly: every adapted layer runs its
    base weight alone (merged weights are unmerged and re-merged on exit), and each module in
    modules_to_save is the original, as PEFT's disable_adapter gives it."""
    require_adapter(model, "disable_adapters")
    layers = [layer for _, layer in adapted_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    _swap_saved_modules(model)
    try:
        yield model
    finally:
        _swap_saved_modules(model)
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()


def _unload(model: nn.Module, merge: bool, who: str, safe_merge: bool = False) -> nn.Module:
    require_adapter(model, who)
    if merge:
        _refuse_sharded(model, who)
    if safe_merge:
        _check_merge_finite(model, who)
    factors = getattr(model, FACTORS_ATTR)
    if not merge:
        _swap_saved_modules(model)  # the original modules back in place of the trained copies
    for path, layer in adapted_layers(model):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        replace_module(model, path, layer.to_linear())
    for path, previous in factors.quantized_cpu_inference.items():
        model.get_submodule(path).support_avx512bf16_for_cpu = previous
    delattr(model, FACTORS_ATTR)
    del model.msplora_config
    withdraw_adapter(model)
    for name, p in model.named_parameters():
        p.requires_grad_(factors.original_requires_grad.get(name, p.requires_grad))
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every adapter and return the model with plain nn.Linear layers, as PEFT does
    (safe_merge as in merge_adapter: on a non-finite merge nothing changes). Modules in
    modules_to_save keep their trained weights, as PEFT's merge_and_unload keeps them."""
    return _unload(model, merge=True, who="merge_and_unload", safe_merge=safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Remove MSPLoRA without merging: the base model as it was, requires_grad flags included.
    Modules in modules_to_save are the originals again, as PEFT's unload gives them (since PEFT
    0.22; earlier releases kept the trained copies): merge_and_unload keeps the trained ones."""
    return _unload(model, merge=False, who="unload")
