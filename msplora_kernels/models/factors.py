"""The root container of an adapter's shared levels and the lookups on it.

Shared levels (a level with a group count) live once, in one container registered at the
model's root (`model.msplora_factors`); adapted layers only reference them. So
model.parameters(), state_dict, DDP and FSDP2 see every tensor once.
"""
from __future__ import annotations

from torch import nn

from .config import MSPLoraConfig
from .layer import LoraLevel, MSPLoraLinear

FACTORS_ATTR = "msplora_factors"


class MSPLoraFactors(nn.Module):
    """The root container of shared levels, factors[target][f"level{l}"][f"group{g}"], and of a
    frozen copy of each module in modules_to_save as it was (original_modules[i] for
    saved_module_paths[i]), which disable_adapters puts back while it is active, as PEFT does."""

    def __init__(self):
        super().__init__()
        self.targets = nn.ModuleDict()
        self.original_modules = nn.ModuleList()
        self.original_requires_grad: dict[str, bool] = {}
        self.layer_paths: list[str] = []
        self.saved_module_paths: list[str] = []
        # path -> bitsandbytes' CPU inference-layout switch of each 4-bit layer before MSPLoRA.
        self.quantized_cpu_inference: dict[str, bool] = {}

    def get_or_create(self, target: str, level: int, group: int, make) -> LoraLevel:
        if target not in self.targets:
            self.targets[target] = nn.ModuleDict()
        levels = self.targets[target]
        if f"level{level}" not in levels:
            levels[f"level{level}"] = nn.ModuleDict()
        groups = levels[f"level{level}"]
        if f"group{group}" not in groups:
            groups[f"group{group}"] = make()
        return groups[f"group{group}"]


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules_to_save of the adapter, by path."""
    factors = getattr(model, FACTORS_ATTR)
    return [(path, model.get_submodule(path)) for path in factors.saved_module_paths]


def adapted_layers(model: nn.Module) -> list[tuple[str, MSPLoraLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, MSPLoraLinear)]


def require_adapter(model: nn.Module, who: str) -> MSPLoraConfig:
    config = getattr(model, "msplora_config", None)
    if config is None or not hasattr(model, FACTORS_ATTR):
        raise ValueError(f"{who}: the model has no MSPLoRA adapter; call apply_msplora or load_msplora first")
    return config
