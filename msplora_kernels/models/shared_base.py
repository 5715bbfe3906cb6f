"""The base model beside its adapted self, sharing every weight: a reference model for TRL's
preference trainers (DPO, KTO) that costs no second copy of the base.

TRL takes the reference from the policy with its adapter off only for a peft.PeftModel; for any
other model it loads a second base model from `config._name_or_path` (a full copy in memory, and an
error for a model built in code), unless ref_log_probs are precomputed. shared_base_model(model)
gives TRL's `ref_model` argument a model of its own module objects (its own train/eval flags,
hooks and forward, which TRL patches) whose parameters and buffers are the policy's own tensors,
with every adapted layer back to its frozen base layer and each module in modules_to_save back to
its original.
"""
from __future__ import annotations

import copy
import itertools

from torch import nn

from .factors import FACTORS_ATTR, adapted_layers, require_adapter
from .transformers_adapter import withdraw_adapter


def shared_base_model(model: nn.Module) -> nn.Module:
    """The base model without the adapter, in eval mode and frozen, sharing every parameter and
    buffer with `model` (nothing is copied but the module objects). Its outputs are those of
    `model` under disable_adapters. It reads the shared tensors as they are when it runs, so it
    stays the base only while the base is frozen, as it is in MSPLoRA training."""
    require_adapter(model, "shared_base_model")
    merged = [path for path, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"shared_base_model: {len(merged)} layers have the adapter merged into their base weight "
                         f"(e.g. {merged[0]}), so the base is not there to share; call mk.unmerge_adapter(model) first")
    # deepcopy with every tensor already in its memo copies the modules and keeps the tensors.
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    base = copy.deepcopy(model, memo=tensors)
    factors = getattr(base, FACTORS_ATTR)
    for path, layer in adapted_layers(base):
        _put(base, path, layer.to_linear())
    for path, original in zip(factors.saved_module_paths, factors.original_modules):
        _put(base, path, original)
    delattr(base, FACTORS_ATTR)
    del base.msplora_config
    withdraw_adapter(base)
    # 4-bit layers keep the layout apply_msplora gave them: bitsandbytes repacks a weight in place
    # when the other layout is asked for, and the tensor is the policy's.
    return base.requires_grad_(False).eval()


def _put(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
