"""MSPLoraConfig: which layers get MSPLoRA, with which pyramid of ranks and groups."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..ops.settings import CHOICES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TYPE = "MSPLORA"
# target_modules value that adapts every nn.Linear inside the model's stacks of layers.
ALL_LINEAR = "all-linear"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _is_int_at_least(value, least: int) -> bool:
    # bool is an Integral too, but True is no rank or layer index.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# The backend names a config may ask for (None: the best available).
BACKEND_NAMES = CHOICES["backend"]


def check_init(init_lora_weights, who: str):
    # `is`, not `==`: 1 == True, but 1 is no init scheme.
    if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights == "gaussian"):
        raise ValueError(f"{who}: init_lora_weights must be True (the paper's and PEFT's: A Kaiming-uniform, "
                         f"B zero), 'gaussian' (A normal with std 1 / rank, B zero) or False (B random too, for "
                         f"tests), got {init_lora_weights!r}")
    return init_lora_weights


@dataclasses.dataclass
class MSPLoraConfig:
    """MSPLoRA settings, in PEFT's spirit.

    target_modules: module names (a layer matches if its path ends with ".name") or one regex
        matched against the whole path, as in PEFT; "all-linear" takes every nn.Linear inside
        the stacks of layers (so not lm_head, a pooler or a classifier head).
    ranks: one rank per level, highest first; (8, 4, 2) is global, mid, layer.
    lora_alpha: one value > 0 for every level, or one per level; a level's scale is alpha / rank.
    use_rslora: scale each level by alpha / sqrt(rank) instead (rank-stabilized LoRA, as PEFT's
        option of that name), which keeps the update's size steady as ranks grow.
    init_lora_weights: as PEFT's: True (the paper's and PEFT's init: A Kaiming-uniform, B zero, so
        a fresh adapter changes nothing), "gaussian" (A normal with std 1 / rank) or False (B
        random too, for tests).
    dropout: dropout on the adapter input, one mask shared by every level.
    groups: groups per level, not decreasing; None means one group per layer. Layer i of N
        belongs to group floor(g * i / N) of a level with g groups. (1, 3, None) is the paper's
        pyramid.
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
    init_lora_weights: Union[bool, str] = True
    dropout: float = 0.0
    groups: Sequence[Optional[int]] = (1, 3, None)
    backend: Optional[str] = None
    modules_to_save: Sequence[str] = ()
    layers_to_transform: Optional[Sequence[int]] = None
    layers_pattern: Optional[Union[str, Sequence[str]]] = None
    rank_pattern: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # Every field is checked here, so a config from arguments and one read from a file (from_dict)
        # are held to the same rules, before any model is touched.
        self.target_modules = self._checked_targets()
        self.modules_to_save = self._checked_names("modules_to_save", self.modules_to_save)
        self.ranks = self._checked_ranks()
        self.groups = self._checked_groups()
        self.layers_to_transform = self._checked_layers()
        self.layers_pattern = self._checked_layers_pattern()
        self.rank_pattern = self._checked_rank_pattern()
        self.lora_alpha = self._checked_alpha()
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"MSPLoraConfig: use_rslora must be true or false, got {self.use_rslora!r}")
        check_init(self.init_lora_weights, "MSPLoraConfig")
        if not _is_number(self.dropout) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"MSPLoraConfig: dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"MSPLoraConfig: backend must be None (the best available) or one of "
                             f"{list(BACKEND_NAMES[1:])}, got {self.backend!r}")

    def _checked_targets(self):
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise ValueError(f"MSPLoraConfig: target_modules {targets!r} is not a valid regex: {exc}") from None
            return targets
        return self._checked_names("target_modules", targets, allow_empty=False)

    @staticmethod
    def _checked_names(field: str, names, allow_empty: bool = True) -> tuple:
        # A lone string would iterate into letters; PEFT takes a list of names here.
        if names is None and allow_empty:
            return ()
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or (not names and not allow_empty):
            raise ValueError(f"MSPLoraConfig: {field} must be a list of module names, e.g. ['classifier'], "
                             f"got {names!r}")
        if not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"MSPLoraConfig: {field} must be non-empty module names, got {names!r}")
        return tuple(names)

    def _checked_ranks(self) -> tuple:
        if isinstance(self.ranks, (str, bytes)) or not isinstance(self.ranks, Sequence) or not self.ranks:
            raise ValueError(f"MSPLoraConfig: ranks must be one int >= 1 per level, e.g. (8, 4, 2), got {self.ranks!r}")
        if not all(_is_int_at_least(r, 1) for r in self.ranks):
            raise ValueError(f"MSPLoraConfig: every rank must be an int >= 1, got ranks={tuple(self.ranks)}")
        return tuple(int(r) for r in self.ranks)

    def _checked_groups(self) -> tuple:
        n = len(self.ranks)
        if isinstance(self.groups, (str, bytes)) or not isinstance(self.groups, Sequence):
            raise ValueError(f"MSPLoraConfig: groups must give each level's number of groups, e.g. (1, 3, None), "
                             f"got {self.groups!r}")
        groups = tuple(self.groups)
        if len(groups) != n:
            raise ValueError(f"MSPLoraConfig: groups has {len(groups)} entries but ranks has {n}: "
                             f"groups={groups}, ranks={self.ranks}")
        sized = [g for g in groups if g is not None]
        if not all(_is_int_at_least(g, 1) for g in sized):
            raise ValueError(f"MSPLoraConfig: groups must be ints >= 1 or None, got {groups}")
        if any(g is None for g in groups[:-1]):
            raise ValueError(f"MSPLoraConfig: only the last level can be per layer (None), got groups={groups}")
        # Equal counts are allowed, as in the paper's code's own default (1, 3, 3, N).
        if any(b < a for a, b in zip(sized, sized[1:])):
            raise ValueError(f"MSPLoraConfig: groups must not decrease from level to level, got {groups}")
        return tuple(None if g is None else int(g) for g in groups)

    def _checked_layers(self):
        if self.layers_to_transform is None:
            return None
        layers = self.layers_to_transform
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
            layers = (layers,)  # PEFT takes a single int too (a negative one is refused below)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers or not all(
                _is_int_at_least(i, 0) for i in layers):
            raise ValueError(f"MSPLoraConfig: layers_to_transform must be layer indices >= 0, "
                             f"got {self.layers_to_transform!r}")
        return tuple(sorted(set(int(i) for i in layers)))

    def _checked_layers_pattern(self):
        if self.layers_pattern is None:
            return None
        names = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        if not isinstance(names, (list, tuple)) or not names or not all(
                isinstance(n, str) and _MODULE_NAME.fullmatch(n) for n in names):
            raise ValueError(f"MSPLoraConfig: layers_pattern must be the name(s) of a module list such as "
                             f"'layers' or 'h' (no dots), got {self.layers_pattern!r}")
        return tuple(names)

    def _checked_alpha(self):
        alpha = self.lora_alpha
        values = alpha if isinstance(alpha, (list, tuple)) else (alpha,)
        if not values or not all(_is_number(a) and math.isfinite(a) and a > 0 for a in values):
            raise ValueError(f"MSPLoraConfig: lora_alpha must be a number > 0, or one per level, got {alpha!r} "
                             f"(a level's scale is alpha / rank; 0 would switch the adapter off, and a negative "
                             f"alpha flips it)")
        if isinstance(alpha, (list, tuple)):
            if len(alpha) != len(self.ranks):
                raise ValueError(f"MSPLoraConfig: lora_alpha has {len(alpha)} entries but ranks has {len(self.ranks)}")
            return tuple(float(a) for a in alpha)
        return float(alpha)

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
