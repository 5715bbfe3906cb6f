"""Spectra of adapter updates from their small factors, and the paper's effective rank space.

The singular values of dW = s A B (A: in x r, B: r x out) come from QR factorizations of A and
of B^T and the SVD of the r x r core, never from a d x d matrix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..models.adapter_io import adapter_state_dict
from ..models.config import WEIGHTS_NAME
from ..models.config import CONFIG_NAME, level_scale
from ..models.factors import FACTORS_ATTR
from ..models.targets import layer_position

# Adapter tensor names: shared levels in the root container, and layers' own levels.
_SHARED = re.compile(rf"^{FACTORS_ATTR}\.targets\.(?P<target>[^.]+)\.level(?P<level>\d+)\.group(?P<group>\d+)\.(?P<ab>[AB])$")
_OWN = re.compile(r"^(?P<path>.+)\.own_levels\.(?P<level>\d+)\.(?P<ab>[AB])$")


def _layer_index(path: str, layers_pattern=None) -> Optional[int]:
    position = layer_position(path, layers_pattern)
    return None if position is None else position[1]


def factor_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values (descending, float64) of scale * a @ b, with a (m x r) and b (r x n)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    _, ra = torch.linalg.qr(a)        # a = Qa Ra
    _, rb = torch.linalg.qr(b.T)      # b^T = Qb Rb, so a b = Qa (Ra Rb^T) Qb^T
    return torch.linalg.svdvals(ra @ rb.T) * abs(scale)


def effective_rank_space(sigma: torch.Tensor) -> list[float]:
    """Paper eq. 8: M_eff-k = (sum_{i<=k} sigma_i) / (sum_j sigma_j), for k = 1..len(sigma).
    An all-zero spectrum (a fresh adapter) has no direction; it gives all zeros."""
    total = float(sigma.sum())
    if total == 0.0:
        return [0.0] * len(sigma)
    return (torch.cumsum(sigma, 0) / total).tolist()


def entropy_effective_rank(sigma: torch.Tensor) -> float:
    """exp(entropy) of the normalized spectrum (Roy and Vetterli): 1 for rank one, r for a flat spectrum."""
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


@dataclass
class FactorPair:
    """One level's factors as they sit in the adapter: shared by a group, or one layer's own."""
    target: str
    level: int
    group: Optional[int]   # group index of a shared level; None for a layer's own level
    layer: Optional[int]   # layer index of a layer's own level
    name: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def singular_values(self) -> torch.Tensor:
        return factor_singular_values(self.a, self.b, self.scale)


def _pairs_from_tensors(tensors: dict, config) -> list[FactorPair]:
    found: dict[str, dict] = {}
    for key, t in tensors.items():
        m = _SHARED.match(key)
        if m:
            base = key[:-2]
            entry = found.setdefault(base, {"target": m["target"], "level": int(m["level"]),
                                            "group": int(m["group"]), "layer": None})
        else:
            m = _OWN.match(key)
            if not m:
                continue  # modules_to_save and anything else that is not a factor
            base = key[:-2]
            entry = found.setdefault(base, {"target": m["path"].rsplit(".", 1)[-1], "level": int(m["level"]),
                                            "group": None, "layer": _layer_index(m["path"], config.layers_pattern)})
        entry[m["ab"]] = t
    pairs = []
    for base, e in sorted(found.items()):
        if "A" not in e or "B" not in e:
            raise ValueError(f"analysis: {base} has only one of its two factors")
        level = e["level"]
        # The rank from the tensor, not config.ranks: rank_pattern may give this layer others.
        scale = level_scale(config.alphas[level], e["A"].shape[1], config.use_rslora)
        pairs.append(FactorPair(e["target"], level, e["group"], e["layer"], base, e["A"], e["B"], scale))
    return pairs


def pairs_from_model(model) -> list[FactorPair]:
    return _pairs_from_tensors(adapter_state_dict(model), model.msplora_config)


def pairs_from_dir(directory) -> tuple[list[FactorPair], "object"]:
    from safetensors.torch import load_file

    from ..models.config import MSPLoraConfig

    config = MSPLoraConfig.from_pretrained(directory)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    return _pairs_from_tensors(tensors, config), config


def lora_layer_spectra(directory) -> dict[str, dict[int, torch.Tensor]]:
    """Singular values of each layer's update in a PEFT LoRA adapter: {target: {layer: sigma}}."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / CONFIG_NAME).read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"analysis: {directory} is not a PEFT LoRA adapter (peft_type={cfg.get('peft_type')!r})")
    scale = level_scale(cfg.get("lora_alpha", 1), cfg.get("r", 1), bool(cfg.get("use_rslora", False)))
    tensors = load_file(str(directory / WEIGHTS_NAME))
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b = tensors[path + ".lora_B.weight"]
        layer = _layer_index(path, cfg.get("layers_pattern"))
        if layer is None:
            continue
        out.setdefault(path.rsplit(".", 1)[-1], {})[layer] = factor_singular_values(a.T, b.T, scale)
    return out
