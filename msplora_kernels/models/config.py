"""MSPLoraConfig: which layers get MSPLoRA, with which pyramid of ranks and groups."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

CONFIG_NAME = "adapter_config.json"
ADAPTER_TYPE = "MSPLORA"
# target_modules value that adapts every nn.Linear inside the model's stacks of layers.
ALL_LINEAR = "all-linear"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_int_at_least(value, least: int) -> bool:
    # bool is an Integral too, but True is no rank or layer index.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


@dataclasses.dataclass
class MSPLoraConfig:
    """MSPLoRA settings, in PEFT's spirit.

    target_modules: module names (a layer matches if its path ends with ".name") or one regex
        matched against the whole path, as in PEFT; "all-linear" takes every nn.Linear inside
        the stacks of layers (so not lm_head, a pooler or a classifier head).
    ranks: one rank per level, highest first; (8, 4, 2) is global, mid, layer.
    lora_alpha: one value for every level, or one per level; a level's scale is alpha / rank.
    use_rslora: scale each level by alpha / sqrt(rank) instead (rank-stabilized LoRA, as PEFT's
        option of that name), which keeps the update's size steady as ranks grow.
    dropout: dropout on the adapter input, one mask shared by every level.
    groups: groups per level; None means one group per layer. Layer i of N belongs to group
        floor(g * i / N) of a level with g groups. (1, 3, None) is the paper's pyramid.
    backend: the kernel backend of every adapted layer (None: the best available).
    modules_to_save: modules trained in full and saved with the adapter (a classifier head),
        matched by name as target_modules are.
    layers_to_transform: indices of the layers to adapt (None: all), as in PEFT. A layer keeps
        its place in the whole stack for the groups: layer i of N shares the mid factors of group
        floor(g i / N) with the other adapted layers of that group.
    rank_pattern: ranks for some layers instead of `ranks`, as in PEFT: {key: ranks}, one rank
        per level, where a key is a module name or a regex matched against the end of a layer's
        path ("v_proj", "mlp\\..*"); the first key that matches wins. Layers that share a level
        must agree on its rank, so a key that picks some layers of a target may change only the
        per-layer level.
    layers_pattern: the name (or names) of the module list that holds a model's layers, as in
        PEFT: "resblocks" for a path like "transformer.resblocks.3.attn.q". None: the usual names
        (layers, layer, h, blocks, block). Unlike PEFT's, it applies with or without
        layers_to_transform, since every adapted layer needs its place in the pyramid.
    """

    target_modules: Union[Sequence[str], str] = ("query", "value")
    ranks: Sequence[int] = (8, 4, 2)
    lora_alpha: Union[float, Sequence[float]] = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    groups: Sequence[Optional[int]] = (1, 3, None)
    backend: Optional[str] = None
    modules_to_save: Sequence[str] = ()
    layers_to_transform: Optional[Sequence[int]] = None
    layers_pattern: Optional[Union[str, Sequence[str]]] = None
    rank_pattern: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ValueError(f"MSPLoraConfig: target_modules {self.target_modules!r} is not a valid regex: {exc}")
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"MSPLoraConfig: target_modules must be non-empty names, got {self.target_modules!r}")
        self.modules_to_save = tuple(self.modules_to_save or ())
        if not all(isinstance(t, str) and t for t in self.modules_to_save):
            raise ValueError(f"MSPLoraConfig: modules_to_save must be module names, got {self.modules_to_save!r}")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
                layers = (layers,)  # PEFT takes a single int too (a negative one is refused below)
            layers = tuple(layers)
            if not layers or not all(_is_int_at_least(i, 0) for i in layers):
                raise ValueError(f"MSPLoraConfig: layers_to_transform must be layer indices >= 0, "
                                 f"got {self.layers_to_transform!r}")
            self.layers_to_transform = tuple(sorted(set(int(i) for i in layers)))
        if self.layers_pattern is not None:
            names = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else tuple(self.layers_pattern)
            if not names or not all(isinstance(n, str) and _MODULE_NAME.fullmatch(n) for n in names):
                raise ValueError(f"MSPLoraConfig: layers_pattern must be the name(s) of a module list such as "
                                 f"'layers' or 'h' (no dots), got {self.layers_pattern!r}")
            self.layers_pattern = names
        self.ranks = tuple(self.ranks)
        self.groups = tuple(self.groups)
        n = len(self.ranks)
        if n == 0:
            raise ValueError("MSPLoraConfig: ranks is empty; give at least one level")
        for r in self.ranks:
            if not _is_int_at_least(r, 1):
                raise ValueError(f"MSPLoraConfig: every rank must be an int >= 1, got ranks={self.ranks}")
        if len(self.groups) != n:
            raise ValueError(f"MSPLoraConfig: groups has {len(self.groups)} entries but ranks has {n}: "
                             f"groups={self.groups}, ranks={self.ranks}")
        sized = [g for g in self.groups if g is not None]
        if not all(_is_int_at_least(g, 1) for g in sized):
            raise ValueError(f"MSPLoraConfig: groups must be ints >= 1 or None, got {self.groups}")
        if any(g is None for g in self.groups[:-1]):
            raise ValueError(f"MSPLoraConfig: only the last level can be per layer (None), got groups={self.groups}")
        if any(b <= a for a, b in zip(sized, sized[1:])):
            raise ValueError(f"MSPLoraConfig: groups must increase from level to level, got {self.groups}")
        self.rank_pattern = self._checked_rank_pattern()
        if isinstance(self.lora_alpha, (list, tuple)):
            self.lora_alpha = tuple(float(a) for a in self.lora_alpha)
            if len(self.lora_alpha) != n:
                raise ValueError(f"MSPLoraConfig: lora_alpha has {len(self.lora_alpha)} entries but ranks has {n}")
        else:
            self.lora_alpha = float(self.lora_alpha)
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"MSPLoraConfig: use_rslora must be true or false, got {self.use_rslora!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"MSPLoraConfig: dropout must be in [0, 1), got {self.dropout!r}")

    def _checked_rank_pattern(self) -> dict:
        if not isinstance(self.rank_pattern, Mapping):
            raise ValueError(f"MSPLoraConfig: rank_pattern must map module names or regexes to ranks, "
                             f"got {self.rank_pattern!r}")
        checked = {}
        for key, ranks in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"MSPLoraConfig: rank_pattern keys must be module names or regexes, got {key!r}")
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"MSPLoraConfig: rank_pattern key {key!r} is not a valid regex: {exc}") from None
            if (isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != self.num_levels
                    or not all(_is_int_at_least(r, 1) for r in ranks)):
                raise ValueError(f"MSPLoraConfig: rank_pattern[{key!r}] must be one int >= 1 per level, as ranks="
                                 f"{self.ranks} is, got {ranks!r}")
            checked[key] = tuple(int(r) for r in ranks)
        return checked

    def ranks_for(self, path: str) -> tuple:
        """The ranks of the layer at `path`: those of the first rank_pattern key that matches the
        end of the path (PEFT's rule: the key, as a regex, after nothing or after a '.'), else ranks."""
        for key, ranks in self.rank_pattern.items():
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", path):
                return ranks
        return self.ranks

    @property
    def num_levels(self) -> int:
        return len(self.ranks)

    @property
    def alphas(self) -> tuple:
        return self.lora_alpha if isinstance(self.lora_alpha, tuple) else (self.lora_alpha,) * self.num_levels

    @property
    def scales(self) -> tuple:
        """Each level's scale, alpha / rank (alpha / sqrt(rank) with use_rslora)."""
        return tuple(level_scale(a, r, self.use_rslora) for a, r in zip(self.alphas, self.ranks))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = d["target_modules"] if isinstance(d["target_modules"], str) else list(d["target_modules"])
        d["ranks"], d["groups"] = list(self.ranks), list(self.groups)
        d["modules_to_save"] = list(self.modules_to_save)
        if self.layers_to_transform is not None:
            d["layers_to_transform"] = list(self.layers_to_transform)
        if self.layers_pattern is not None:
            d["layers_pattern"] = list(self.layers_pattern)
        d["rank_pattern"] = {key: list(ranks) for key, ranks in self.rank_pattern.items()}
        if isinstance(self.lora_alpha, tuple):
            d["lora_alpha"] = list(self.lora_alpha)
        return {"adapter_type": ADAPTER_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "MSPLoraConfig":
        d = dict(d)
        kind = d.pop("adapter_type", None)
        if kind != ADAPTER_TYPE:
            raise ValueError(f"MSPLoraConfig: adapter_type is {kind!r}, not {ADAPTER_TYPE!r} (is this a PEFT LoRA directory?)")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"msplora_version"})
        if unknown:
            raise ValueError(f"MSPLoraConfig: unknown fields {unknown}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def save_pretrained(self, directory) -> None:
        from .._version import __version__

        Path(directory).mkdir(parents=True, exist_ok=True)
        data = {**self.to_dict(), "msplora_version": __version__}
        (Path(directory) / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory) -> "MSPLoraConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            hint = ""
            if (Path(directory) / "config.json").is_file():
                hint = ("; it holds a whole model's config.json (Trainer.save_model or save_pretrained writes the "
                        "whole model): write the adapter with save_adapter(model, dir), or pass "
                        "callbacks=[SaveAdapterCallback()] to the Trainer")
            raise FileNotFoundError(f"MSPLoraConfig: no {CONFIG_NAME} in {directory}{hint}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"MSPLoraConfig: {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def level_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """A level's scale: alpha / rank, or alpha / sqrt(rank) with rank-stabilized LoRA (rsLoRA,
    Kalajdzievski 2023), as PEFT's use_rslora gives it."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def group_of(layer: int, num_layers: int, groups: Optional[int]) -> int:
    """The group of layer `layer` of `num_layers` in a level with `groups` groups (None: per layer)."""
    if groups is None:
        return layer
    return (groups * layer) // num_layers
