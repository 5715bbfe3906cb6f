"""MSPLoRA on whole models: injection into Hugging Face transformers, counts, merge and unload.

Shared levels (a level with a group count) live once, in one container registered at the
model's root (`model.msplora_factors`); adapted layers only reference them. Per-layer levels
are owned by their layer. So model.parameters(), state_dict, DDP and FSDP2 see every
tensor once.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import ALL_LINEAR, MSPLoraConfig, group_of
from .layer import LoraLevel, MSPLoraLinear, is_conv1d, linear_features, require_float_weight

FACTORS_ATTR = "msplora_factors"
# The names of the module lists that hold a model's layers, unless the config's layers_pattern says.
DEFAULT_LAYER_LISTS = ("layers", "layer", "h", "blocks", "block")


@functools.lru_cache(maxsize=32)
def _layer_index_regex(names: tuple) -> re.Pattern:
    return re.compile(rf"(?:^|\.)({'|'.join(map(re.escape, names))})\.(\d+)(?=\.|$)")


def layer_position(path: str, layers_pattern=None) -> tuple[str, int] | None:
    """(stack path, layer index) of a module path's first '<list>.<i>' component, if any, where
    <list> is one of layers_pattern's names (None: DEFAULT_LAYER_LISTS)."""
    names = (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern or DEFAULT_LAYER_LISTS)
    m = _layer_index_regex(names).search(path)
    return None if m is None else (path[: m.start(2) - 1], int(m.group(2)))


class MSPLoraFactors(nn.Module):
    """The root container of shared levels: factors[target][f"level{l}"][f"group{g}"]."""

    def __init__(self):
        super().__init__()
        self.targets = nn.ModuleDict()
        self.original_requires_grad: dict[str, bool] = {}
        self.layer_paths: list[str] = []
        self.saved_module_paths: list[str] = []

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


@dataclass
class _Site:
    path: str
    linear: nn.Module  # an nn.Linear or a transformers Conv1D
    target: str
    layer: int
    num_layers: int
    ranks: tuple = ()  # the config's, or its rank_pattern's for this path


def _matches(path: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _targeted(path: str, config: MSPLoraConfig) -> bool:
    if config.target_modules == ALL_LINEAR:
        # As in PEFT, but a linear outside the stacks of layers (lm_head, a pooler, a classifier)
        # has no place in the pyramid, so it is left out rather than refused.
        return layer_position(path, config.layers_pattern) is not None
    return _matches(path, config.target_modules)


def _place_in_layer(stack: str, site: _Site) -> str:
    """The site's path inside its layer: 'attention.output.dense' in '...layer.3.attention.output.dense'."""
    return site.path[len(stack) + len(f".{site.layer}.") :]


def _name_targets_by_place(sites: list[tuple[str, _Site]]) -> None:
    """A target (one set of shared factors) is named by the module's last name ('query'), so
    T5's self- and cross-attention 'q' share. Where that name sits in several places of a layer
    with different shapes, as BERT's 'dense' does (attention.output, intermediate, output), the
    places cannot share, and each becomes its own target: 'attention_output_dense' and so on."""
    shapes: dict[tuple[str, str], dict[str, tuple]] = {}
    for stack, site in sites:
        shape = linear_features(site.linear)
        shapes.setdefault((stack, site.target), {})[_place_in_layer(stack, site)] = shape
    for stack, site in sites:
        if len(set(shapes[(stack, site.target)].values())) > 1:
            site.target = _place_in_layer(stack, site).replace(".", "_")


def _sites(model: nn.Module, config: MSPLoraConfig) -> list[_Site]:
    linears = [(p, m) for p, m in model.named_modules() if p and (isinstance(m, nn.Linear) or is_conv1d(m))]
    found = [(p, m) for p, m in linears if _targeted(p, config)]
    if not found:
        names = [p for p, _ in linears][:12]
        raise ValueError(f"apply_msplora: no nn.Linear or Conv1D matches target_modules={config.target_modules!r}; "
                         f"linear layers include {names}")
    sites = []
    for path, linear in found:
        require_float_weight(linear, "apply_msplora", path)
        position = layer_position(path, config.layers_pattern)
        if position is None:
            lists = config.layers_pattern or DEFAULT_LAYER_LISTS
            raise ValueError(f"apply_msplora: {path!r} is not inside a stack of layers (no '<list>.<i>' in its "
                             f"path for a <list> in {list(lists)}), so it has no place in the pyramid; name the "
                             f"module list that holds the layers with layers_pattern, or narrow target_modules")
        stack, index = position
        site = _Site(path, linear, path.rsplit(".", 1)[-1], index, len(model.get_submodule(stack)),
                     config.ranks_for(path))
        sites.append((stack, site))
    _name_targets_by_place(sites)
    if len({stack for stack, _ in sites}) > 1:
        # Several stacks (an encoder and a decoder): each keeps its own shared levels.
        for stack, site in sites:
            site.target = f"{stack.replace('.', '_')}__{site.target}"
    # Chosen after naming, so that a target's factors have the same names whatever the subset.
    return _only_layers(sites, config.layers_to_transform)


def _only_layers(sites: list[tuple[str, _Site]], layers) -> list[_Site]:
    """The sites in the layers `layers_to_transform` names (all if None). A layer keeps its place
    in the whole stack: layer i of N still shares the mid factors of group floor(g i / N)."""
    if layers is None:
        return [site for _, site in sites]
    depths = {stack: site.num_layers for stack, site in sites}
    beyond = [i for i in layers if all(i >= n for n in depths.values())]
    if beyond:
        raise ValueError(f"apply_msplora: layers_to_transform has {beyond}, beyond every stack of layers "
                         f"({', '.join(f'{s} has {n}' for s, n in depths.items())})")
    return [site for _, site in sites if site.layer in layers]


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
    sites = _sites(model, config)
    # Layers that share a factor must agree in shape; name the first pair that does not.
    owners: dict[tuple, _Site] = {}
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
    for p in model.parameters():
        p.requires_grad_(False)
    for site in sites:
        w = site.linear.weight

        dtype = adapter_dtype_for(w.dtype, autocast_adapter_dtype)

        def make(rank, alpha, site=site, w=w, dtype=dtype):
            return lambda: LoraLevel(*linear_features(site.linear), rank, alpha, use_rslora=config.use_rslora,
                                     device=w.device, dtype=dtype)

        levels = [
            None if g is None else factors.get_or_create(site.target, level, group_of(site.layer, site.num_layers, g),
                                                         make(site.ranks[level], config.alphas[level]))
            for level, g in enumerate(config.groups)
        ]
        layer = MSPLoraLinear.from_linear(site.linear, ranks=site.ranks, lora_alpha=config.alphas, use_rslora=config.use_rslora,
                                          dropout=config.dropout, levels=levels, backend=config.backend, dtype=dtype)
        parent_path, _, attr = site.path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, layer)
        factors.layer_paths.append(site.path)
    for path, module in list(model.named_modules()):
        if path and config.modules_to_save and _matches(path, config.modules_to_save):
            module.requires_grad_(True)
            factors.saved_module_paths.append(path)
    model.add_module(FACTORS_ATTR, factors)
    model.msplora_config = config
    return model


def saved_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules_to_save of the adapter, by path."""
    factors = getattr(model, FACTORS_ATTR)
    return [(path, model.get_submodule(path)) for path in factors.saved_module_paths]


def adapted_layers(model: nn.Module) -> list[tuple[str, MSPLoraLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, MSPLoraLinear)]


def _require_adapter(model: nn.Module, who: str) -> MSPLoraConfig:
    config = getattr(model, "msplora_config", None)
    if config is None or not hasattr(model, FACTORS_ATTR):
        raise ValueError(f"{who}: the model has no MSPLoRA adapter; call apply_msplora or load_msplora first")
    return config


def summary(model: nn.Module) -> dict:
    """Trainable parameters per level and in total, next to LoRA's count for the same layers
    at the global rank (what the paper compares against; each layer's own, under rank_pattern)."""
    config = _require_adapter(model, "summary")
    layers = adapted_layers(model)
    per_level = []
    for level in range(config.num_levels):
        unique = {id(layer.levels[level]): layer.levels[level] for _, layer in layers}
        ranks = sorted({lvl.rank for lvl in unique.values()})
        per_level.append({
            "level": level,
            "rank": ranks[0] if len(ranks) == 1 else ranks,  # a list where rank_pattern varies it
            "groups": config.groups[level] if config.groups[level] is not None else "per layer",
            "factor_pairs": len(unique),
            "params": sum(lvl.A.numel() + lvl.B.numel() for lvl in unique.values()),
        })
    total = sum(row["params"] for row in per_level)
    lora = sum(layer.ranks[0] * (layer.in_features + layer.out_features) for _, layer in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    every = sum(p.numel() for p in model.parameters())
    return {"levels": per_level, "total": total, "lora_rank": per_level[0]["rank"], "lora_equivalent": lora,
            "adapted_layers": len(layers), "trainable": trainable, "all_params": every}


def print_trainable_parameters(model: nn.Module) -> None:
    s = summary(model)
    print(f"trainable params: {s['trainable']:,} || all params: {s['all_params']:,} || "
          f"trainable%: {100 * s['trainable'] / max(s['all_params'], 1):.4f}")
    for row in s["levels"]:
        print(f"  level {row['level']}: rank {row['rank']!s:>3}, groups {row['groups']!s:>9}, "
              f"{row['factor_pairs']:>4} factor pairs, {row['params']:,} params")
    print(f"  MSPLoRA total {s['total']:,} vs LoRA r={s['lora_rank']} on the same {s['adapted_layers']} layers "
          f"{s['lora_equivalent']:,} ({s['total'] / s['lora_equivalent']:.3f}x)")


def _check_merge_finite(model: nn.Module, who: str) -> None:
    # Every layer first, so that a refused merge has merged nothing.
    bad = [path for path, layer in adapted_layers(model) if not layer.merged and not layer.merge_is_finite()]
    if bad:
        raise ValueError(f"{who}: merging would put NaN or inf into {len(bad)} layer(s): "
                         f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; nothing was merged")


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> None:
    """Fold every adapter into its base weight in place (inference at nn.Linear speed).
    safe_merge, as in PEFT: check every merged weight is finite first, and merge nothing if not."""
    _require_adapter(model, "merge_adapter")
    if safe_merge:
        _check_merge_finite(model, "merge_adapter")
    for _, layer in adapted_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    _require_adapter(model, "unmerge_adapter")
    for _, layer in adapted_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base outputs; merged weights are unmerged and
    re-merged on exit."""
    _require_adapter(model, "disable_adapters")
    layers = [layer for _, layer in adapted_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()


def _unload(model: nn.Module, merge: bool, who: str, safe_merge: bool = False) -> nn.Module:
    _require_adapter(model, who)
    if safe_merge:
        _check_merge_finite(model, who)
    factors = getattr(model, FACTORS_ATTR)
    for path, layer in adapted_layers(model):
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path), attr, layer.to_linear())
    delattr(model, FACTORS_ATTR)
    del model.msplora_config
    for name, p in model.named_parameters():
        p.requires_grad_(factors.original_requires_grad.get(name, p.requires_grad))
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every adapter and return the model with plain nn.Linear layers, as PEFT does
    (safe_merge as in merge_adapter: on a non-finite merge nothing changes)."""
    return _unload(model, merge=True, who="merge_and_unload", safe_merge=safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Remove MSPLoRA without merging: the base model as it was, requires_grad flags included."""
    return _unload(model, merge=False, who="unload")
