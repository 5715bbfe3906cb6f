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
from typing import Optional

from torch import nn

from .factors import FACTORS_ATTR, adapted_layers, adapter_named, refuse_merged, replace_module, require_adapter
from .transformers_adapter import withdraw_adapter


def shared_base_model(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """The base model without the adapter, in eval mode, sharing every parameter and
    buffer with `model` (nothing is copied but the module objects). Its outputs are those of
    `model` under disable_adapters. It reads the shared tensors as they are when it runs, so it
    stays the base only while the base is frozen, as it is in MSPLoRA training.

    With adapter_name, the base with that one adapter of `model` active instead (say a trained SFT
    adapter, as the reference of a DPO run that trains another adapter): its outputs are those of
    `model` with only that adapter set active. That adapter must not be one `model` trains."""
    require_adapter(model, "shared_base_model")
    refuse_merged(model, "shared_base_model", ", so the base is not there to share")
    factors = getattr(model, FACTORS_ATTR)
    if adapter_name is not None:
        adapter_named(model, "shared_base_model", adapter_name)
        if adapter_name in factors.active:
            raise ValueError(f"shared_base_model: {adapter_name!r} is active in the model, so it trains; a reference "
                             "is an adapter the model does not train: set_adapter(model, ...) to the adapter to train "
                             "first")
    # deepcopy with every tensor already in its memo copies the modules and keeps the tensors.
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    base = copy.deepcopy(model, memo=tensors)
    copied = getattr(base, FACTORS_ATTR)
    for path, layer in adapted_layers(base):
        for other in [n for n in layer.adapter_levels if n != adapter_name]:
            layer.remove_adapter(other)
        if adapter_name in layer.adapter_levels:
            layer.set_active((adapter_name,))
        else:
            replace_module(base, path, layer.to_linear())
    withdraw_adapter(base)
    if adapter_name is None:
        for path, original in zip(copied.saved_module_paths, copied.original_modules):
            replace_module(base, path, original)
        delattr(base, FACTORS_ATTR)
        del base.msplora_config
    else:
        # The copy keeps the one adapter's shared levels (their tensors the model's) and nothing
        # of the others; its flags are set here, not by set_adapter, which would change the shared
        # tensors' requires_grad in the model too.
        for other in [n for n in copied.configs if n != adapter_name]:
            copied.drop_shared_levels(other)
        copied.configs = {adapter_name: copied.configs[adapter_name]}
        copied.active = (adapter_name,)
        base.msplora_config = copied.configs[adapter_name]
    # 4-bit layers keep the layout apply_msplora gave them: bitsandbytes repacks a weight in place
    # when the other layout is asked for, and the tensor is the policy's. requires_grad is left as
    # it is: every tensor here is the model's, and the model froze all of them (the trained ones,
    # the active adapter's and modules_to_save's, are not here).
    return base.eval()

