"""Telling a transformers model that it carries an adapter, the way transformers' own
`model.add_adapter` does, so that the stock Trainer treats an MSPLoRA model as an adapted model.

transformers reads four attributes of a model that carries adapters (its PeftAdapterMixin):
`_hf_peft_config_loaded`, `peft_config` (name -> a config with save_pretrained), `active_adapters()`
and `get_adapter_state_dict()`. With them set on the instance:

- the Trainer accepts a model quantized by transformers' bitsandbytes quantizer (it refuses to
  fine-tune a quantized model without an adapter: trainer_utils.validate_quantization_for_training);
- `model.save_pretrained(dir)`, and so every Trainer checkpoint and `model.push_to_hub`, writes the
  adapter alone (adapter_config.json, adapter_model.safetensors), as for a PEFT model, not a copy
  of the frozen base. transformers prefixes the tensor names with `base_model.model.`, PEFT's
  convention; load_adapter reads both spellings.

Nothing in transformers is changed: the attributes live on the one model object, and unload and
merge_and_unload take them away again, so a merged model saves in full.
"""
from __future__ import annotations

import functools

from torch import nn

from .adapter_tensors import tensors_to_write

PEFT_KEY_PREFIX = "base_model.model."
_ATTRIBUTES = ("_hf_peft_config_loaded", "peft_config", "active_adapters", "get_adapter_state_dict")


def is_transformers_model(model: nn.Module) -> bool:
    # PeftAdapterMixin, which every PreTrainedModel has, defines the flag on the class.
    return hasattr(type(model), "_hf_peft_config_loaded") and hasattr(model, "save_pretrained")


def announce_adapter(model: nn.Module, factors) -> None:
    """Set the attributes on a transformers model (other modules are left alone), from the model's
    adapters (factors.MSPLoraFactors: their configs and the active ones)."""
    if not is_transformers_model(model):
        return
    model._hf_peft_config_loaded = True
    model.peft_config = factors.configs
    model.active_adapters = functools.partial(_active_adapters, factors)
    model.get_adapter_state_dict = functools.partial(_adapter_state_dict, model)


def withdraw_adapter(model: nn.Module) -> None:
    """Remove what announce_adapter set, so the class's own attributes answer again."""
    for name in _ATTRIBUTES:
        model.__dict__.pop(name, None)


def without_peft_prefix(tensors: dict) -> dict:
    """The names as the model has them, for a file written by transformers' save_pretrained."""
    if tensors and all(k.startswith(PEFT_KEY_PREFIX) for k in tensors):
        return {k[len(PEFT_KEY_PREFIX):]: v for k, v in tensors.items()}
    return tensors


def _active_adapters(factors) -> list[str]:
    return list(factors.active)


def _adapter_state_dict(model, adapter_name=None, state_dict=None):
    # transformers passes the whole model's state dict (the quantizer's, for a quantized base);
    # the adapter's tensors are read from the model instead, gathered where they are sharded.
    return tensors_to_write(model, "save_pretrained", adapter_name)
