"""Which layers of a model get MSPLoRA, and where each sits in the pyramid.

A layer's place is its stack of layers (the module list its path goes through), its index in
that stack, and its target: the name of the factors it shares with the same layer of other
indices.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from torch import nn

from .base_layers import is_conv1d, check_base_weight
from .config import ALL_LINEAR, MSPLoraConfig
from .layer import MSPLoraLinear

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


@dataclass
class Site:
    """A base layer that gets MSPLoRA: where it is, which factors it shares, its ranks."""
    path: str
    linear: nn.Module  # an nn.Linear or a transformers Conv1D
    target: str
    layer: int
    num_layers: int
    ranks: tuple = ()  # the config's, or its rank_pattern's for this path


def matches(path: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _targeted(path: str, config: MSPLoraConfig) -> bool:
    if config.target_modules == ALL_LINEAR:
        # As in PEFT, but a linear outside the stacks of layers (lm_head, a pooler, a classifier)
        # has no place in the pyramid, so it is left out rather than refused.
        return layer_position(path, config.layers_pattern) is not None
    return matches(path, config.target_modules)


def _place_in_layer(stack: str, site: Site) -> str:
    """The site's path inside its layer: 'attention.output.dense' in '...layer.3.attention.output.dense'."""
    return site.path[len(stack) + len(f".{site.layer}.") :]


def _name_targets_by_place(sites: list[tuple[str, Site]]) -> None:
    """Layers share a level when they sit at the same place in their layers: the module path with
    the stack and the layer index removed, as the paper's code shares. A target (one set of shared
    factors) is named by the module's last name ('query') where that name has one place in its
    stack, and by the whole place where it has several: T5's self- and cross-attention 'q'
    ('layer_0_SelfAttention_q', 'layer_1_EncDecAttention_q'), BERT's three 'dense' layers."""
    places: dict[tuple[str, str], set] = {}
    for stack, site in sites:
        places.setdefault((stack, site.target), set()).add(_place_in_layer(stack, site))
    for stack, site in sites:
        if len(places[(stack, site.target)]) > 1:
            site.target = _place_in_layer(stack, site).replace(".", "_")


def _fused_expert_weights(model: nn.Module, layers_pattern) -> list[tuple[str, tuple]]:
    """A mixture of experts' fused expert weights, by name and shape: transformers 5 keeps
    Mixtral's and Qwen-MoE's experts as (experts, out, in) tensors, inside the stack of layers.
    Convolutions' 3-D weights and tensors outside the layers (ViT's position embeddings) are not."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or layer_position(path, layers_pattern) is None:
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point():
                found.append((f"{path}.{name}", tuple(p.shape)))
    return found


def _refuse_skipped_experts(model: nn.Module, config: MSPLoraConfig, linears: list) -> None:
    """MSPLoRA adapts nn.Linear and Conv1D layers. Fused expert weights are none, so "all-linear",
    or a target naming the experts, would leave them out without a word: refuse instead."""
    experts = _fused_expert_weights(model, config.layers_pattern)
    if not experts:
        return
    if config.target_modules == ALL_LINEAR:
        named = experts
    else:  # a target naming the experts' module or the weight itself
        named = [(n, s) for n, s in experts
                 if matches(n.rpartition(".")[0], config.target_modules) or matches(n, config.target_modules)]
    if not named:
        return
    shown = ", ".join(f"{n} {s}" for n, s in named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
    layer_names = sorted({p.rsplit(".", 1)[-1] for p, _ in linears if layer_position(p, config.layers_pattern)})
    raise ValueError(f"apply_msplora: target_modules={config.target_modules!r} reaches fused expert weights, which "
                     f"MSPLoRA does not adapt (it adapts nn.Linear and Conv1D layers): {shown}. They would stay "
                     f"frozen. Name the linear layers to adapt instead, knowing the experts stay frozen: for this "
                     f"model target_modules={layer_names!r}, or a subset")


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer by path: nn.Linear, Conv1D, and the base layer of each MSPLoraLinear (an
    adapted layer takes another adapter), but nothing inside an MSPLoraLinear or the adapters'
    container (a quantized base kept there is no layer of its own)."""
    found, inside = [], ()
    for path, module in model.named_modules():
        if not path or (inside and path.startswith(inside)) or path.split(".")[0] == "msplora_factors":
            continue
        if isinstance(module, MSPLoraLinear):
            found.append((path, module.to_linear()))
            inside = tuple({*inside, path + "."})
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            found.append((path, module))
    return found


def find_sites(model: nn.Module, config: MSPLoraConfig) -> list[Site]:
    linears = _linears(model)
    _refuse_skipped_experts(model, config, linears)
    found = [(p, m) for p, m in linears if _targeted(p, config)]
    if not found:
        names = [p for p, _ in linears][:12]
        raise ValueError(f"apply_msplora: no nn.Linear or Conv1D matches target_modules={config.target_modules!r}; "
                         f"linear layers include {names}")
    sites = []
    for path, linear in found:
        check_base_weight(linear, "apply_msplora", path)
        position = layer_position(path, config.layers_pattern)
        if position is None:
            lists = config.layers_pattern or DEFAULT_LAYER_LISTS
            raise ValueError(f"apply_msplora: {path!r} is not inside a stack of layers (no '<list>.<i>' in its "
                             f"path for a <list> in {list(lists)}), so it has no place in the pyramid; name the "
                             f"module list that holds the layers with layers_pattern, or narrow target_modules")
        stack, index = position
        site = Site(path, linear, path.rsplit(".", 1)[-1], index, len(model.get_submodule(stack)),
                     config.ranks_for(path))
        sites.append((stack, site))
    _name_targets_by_place(sites)
    if len({stack for stack, _ in sites}) > 1:
        # Several stacks (an encoder and a decoder): each keeps its own shared levels.
        for stack, site in sites:
            site.target = f"{stack.replace('.', '_')}__{site.target}"
    # Chosen after naming, so that a target's factors have the same names whatever the subset.
    return _only_layers(sites, config.layers_to_transform)


def _only_layers(sites: list[tuple[str, Site]], layers) -> list[Site]:
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
