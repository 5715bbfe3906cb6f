"""The root container of a model's adapters' shared levels and the lookups on it.

Shared levels (a level with a group count) live once, in one container registered at the
model's root (`model.msplora_factors`); adapted layers only reference them. So
model.parameters(), state_dict, DDP and FSDP2 see every tensor once. The adapter named
"default" keeps its shared levels in the root container itself (`msplora_factors.targets`), the
names its files use; every other adapter in `msplora_factors.adapters["adapter_<name>"]` (the
prefix keeps names such as "train", which TRL's recipes use, clear of nn.Module's attributes).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from .config import MSPLoraConfig
from .layer import DEFAULT_ADAPTER, LoraLevel, MSPLoraLinear

FACTORS_ATTR = "msplora_factors"


class AdapterFactors(nn.Module):
    """One adapter's shared levels, targets[target][f"level{l}"][f"group{g}"]."""

    def __init__(self):
        super().__init__()
        self.targets = nn.ModuleDict()

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


class MSPLoraFactors(AdapterFactors):
    """The root container: the "default" adapter's shared levels (its own `targets`), every other
    adapter's in adapters[shared_key(name)], each adapter's config (configs, in the order they were added)
    and which are active; and, for the model as it was before any adapter, a frozen copy of each
    module in modules_to_save (original_modules[i] for saved_module_paths[i]), which
    disable_adapters puts back while it is active, as PEFT does."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, MSPLoraConfig] = {}
        self.active: tuple = ()
        self.original_modules = nn.ModuleList()
        self.original_requires_grad: dict[str, bool] = {}
        self.layer_paths: list[str] = []
        self.saved_module_paths: list[str] = []
        # path -> bitsandbytes' CPU inference-layout switch of each 4-bit layer before MSPLoRA.
        self.quantized_cpu_inference: dict[str, bool] = {}

    def shared_levels(self, adapter_name: str, create: bool = True) -> Optional[AdapterFactors]:
        """The container of one adapter's shared levels, made when first asked for (or None, with
        create=False, where the adapter has none)."""
        if adapter_name == DEFAULT_ADAPTER:
            return self
        key = shared_key(adapter_name)
        if key not in self.adapters and create:
            self.adapters[key] = AdapterFactors()
        return self.adapters[key] if key in self.adapters else None

    def drop_shared_levels(self, adapter_name: str) -> None:
        if adapter_name == DEFAULT_ADAPTER:
            self.targets = nn.ModuleDict()
        elif shared_key(adapter_name) in self.adapters:
            del self.adapters[shared_key(adapter_name)]


def shared_key(adapter_name: str) -> str:
    """The key of an adapter other than "default" in the root container's adapters."""
    return f"adapter_{adapter_name}"


def replace_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put `module` at `path` in the model, and return the one that was there."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    previous = getattr(parent, attr)
    setattr(parent, attr, module)
    return previous


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules_to_save of the adapter, by path."""
    factors = getattr(model, FACTORS_ATTR)
    return [(path, model.get_submodule(path)) for path in factors.saved_module_paths]


def adapted_layers(model: nn.Module) -> list[tuple[str, MSPLoraLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, MSPLoraLinear)]


def layers_with(model: nn.Module, adapter_name: str) -> list[tuple[str, tuple]]:
    """(path, that adapter's levels) of every layer the adapter adapts."""
    return [(path, layer.adapter_levels[adapter_name]) for path, layer in adapted_layers(model)
            if adapter_name in layer.adapter_levels]


def refuse_merged(model: nn.Module, who: str, why: str = "") -> None:
    """Raise when some layers hold an adapter merged into their weight (naming one, and `why`
    that matters to `who`): the call needs the base weights apart from the adapters."""
    merged = [path for path, layer in adapted_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"{who}: {len(merged)} layers have an adapter merged into their weight (e.g. {merged[0]})"
                         f"{why}; call mk.unmerge_adapter(model) first")


def require_adapter(model: nn.Module, who: str) -> MSPLoraConfig:
    config = getattr(model, "msplora_config", None)
    if config is None or not hasattr(model, FACTORS_ATTR):
        raise ValueError(f"{who}: the model has no MSPLoRA adapter; call apply_msplora or load_msplora first")
    return config


def adapter_named(model: nn.Module, who: str, adapter_name: Optional[str] = None) -> str:
    """The adapter a call is about: `adapter_name`, or where it is None the one active adapter."""
    require_adapter(model, who)
    factors = getattr(model, FACTORS_ATTR)
    if adapter_name is None:
        if len(factors.active) != 1:
            raise ValueError(f"{who}: {'no adapter is' if not factors.active else 'several adapters are'} active "
                             f"({list(factors.active)}); name one with adapter_name= (the model has "
                             f"{list(factors.configs)})")
        return factors.active[0]
    if adapter_name not in factors.configs:
        raise ValueError(f"{who}: the model has no adapter named {adapter_name!r}; it has {list(factors.configs)}")
    return adapter_name
