"""MSPLoraLinear: a drop-in nn.Linear with a multi-scale pyramid of low-rank updates."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import reference
from ..ops.functional import add_joined_update, joined_factors, msplora_add, msplora_linear
from ..ops.validation import check_inputs
from .base_layers import (check_base_weight, compute_dtype, dequantized_weight, is_conv1d, linear_features,
                          quantized_kind, requantize)
from .config import check_init, level_scale


class LoraLevel(nn.Module):
    """One level's factors: A (in_features x rank) and B (rank x out_features).

    The level's output is scale * (x A) B with scale = alpha / rank (alpha / sqrt(rank) with
    use_rslora). A level may be shared by several MSPLoraLinear layers; it is then registered
    once, by its owner. init_lora_weights as PEFT's: True, the paper's and PEFT's default (A
    Kaiming-uniform over its fan-in, B zero, so a fresh adapter changes nothing), "gaussian" (A
    normal with std 1 / rank, B zero) or False (B random too: an adapter that changes the model,
    for tests).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 16.0, *, use_rslora: bool = False,
                 init_lora_weights=True, device=None, dtype=None):
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoraLevel: rank must be an int >= 1, got {rank!r}")
        if not isinstance(use_rslora, bool):
            raise TypeError(f"LoraLevel: use_rslora must be a bool, got {use_rslora!r}")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, float(alpha)
        self.use_rslora = use_rslora
        self.init_lora_weights = check_init(init_lora_weights, "LoraLevel")
        self.A = nn.Parameter(torch.empty(in_features, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(rank, out_features, device=device, dtype=dtype))
        self.reset_parameters()
        # The dtype the factors were made in or last converted to through the module (.to(),
        # .float(), .bfloat16()): see factor_dtypes.restore_factor_dtypes.
        self.factor_dtype = self.A.dtype

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.factor_dtype = self.A.dtype
        return out

    @property
    def scale(self) -> float:
        return level_scale(self.alpha, self.rank, self.use_rslora)

    def reset_parameters(self) -> None:
        # PEFT keeps A as an nn.Linear weight (rank, in_features); its transposed view here has
        # the same fan-in, so each scheme draws exactly PEFT's distribution.
        if self.init_lora_weights == "gaussian":
            nn.init.normal_(self.A, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))
        if self.init_lora_weights is False:
            nn.init.kaiming_uniform_(self.B.T, a=math.sqrt(5))  # as nn.Linear(rank, out_features) would
        else:
            nn.init.zeros_(self.B)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"
                + (", use_rslora=True" if self.use_rslora else ""))


DEFAULT_ADAPTER = "default"


def own_level_key(adapter_name: str, index: int) -> str:
    """The key of an adapter's own level i in a layer's own_levels: "i" for the adapter named
    "default", so that a model with one adapter has the names its files use; "<name>_i" for others."""
    return str(index) if adapter_name == DEFAULT_ADAPTER else f"{adapter_name}_{index}"


def _per_level(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"MSPLoraLinear: {name} has {len(value)} entries but there are {n} levels")
        return list(value)
    return [value] * n


# Optimizer steps taken in this process, counted from the first join on. A fused optimizer
# (AdamW(fused=True), which the Trainer picks) writes parameters without bumping their version
# counters, so a joined-factor cache keyed on versions alone served stale factors after training.
_optimizer_steps = [0]
_optimizer_hook = []


def _optimizer_steps_so_far() -> int:
    if _optimizer_hook:
        return _optimizer_steps[0]
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _optimizer_hook.append(register_optimizer_step_post_hook(
        lambda *_: _optimizer_steps.__setitem__(0, _optimizer_steps[0] + 1)))
    return _optimizer_steps[0]


class MSPLoraLinear(nn.Module):
    """y = x W^T + b + sum_i (alpha_i / r_i) (dropout(x) A_i) B_i, with W and b frozen
    (alpha_i / sqrt(r_i) with use_rslora).

    Levels are ordered as `ranks` (highest first: global, mid, layer). `levels` may pass
    in existing LoraLevel objects, one per rank (None where the layer should own a new
    one); a passed level is referenced, not registered, so its owner registers it once
    and its gradient sums over every layer that uses it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        ranks: Sequence[int] = (8, 4, 2),
        lora_alpha=16,
        use_rslora: bool = False,
        init_lora_weights=True,
        dropout: float = 0.0,
        levels: Optional[Sequence[Optional[LoraLevel]]] = None,
        backend: Optional[str] = None,
        adapter_name: str = DEFAULT_ADAPTER,
        device=None,
        dtype=None,
        _weight: Optional[nn.Parameter] = None,
        _bias: Optional[nn.Parameter] = None,
        _base_layer: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        # A quantized base (bitsandbytes) is kept whole, as base_layer: its own forward gives
        # x W^T + b from the quantized weight, which is never copied to floats.
        self.base_layer = _base_layer
        if _base_layer is not None:
            _weight, _bias = None, None
            _base_layer.requires_grad_(False)
        elif _weight is None:
            base = nn.Linear(in_features, out_features, bias=bias, **factory)
            _weight, _bias = base.weight, base.bias
        self.weight = _weight
        self.bias = _bias
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"MSPLoraLinear: dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.backend = backend
        self.merged = False
        self.disabled = False
        # True when made from a Conv1D: weight is that layer's own (in, out) Parameter, so the
        # model's state_dict keeps its keys and layout, and to_linear() gives the Conv1D back.
        self.fan_in_fan_out = False
        self.init_lora_weights = check_init(init_lora_weights, "MSPLoraLinear")
        frozen = self.weight if _base_layer is None else _base_layer.weight
        # Several adapters may sit on one layer: each has its levels (adapter_levels[name], its own
        # ones registered in own_levels under own_level_key) and dropout; the active ones' levels,
        # joined, are what the layer computes with (_levels), so one adapter or several cost alike.
        self.own_levels = nn.ModuleDict()
        self.adapter_levels: dict[str, tuple] = {}
        self.adapter_dropout: dict[str, float] = {}
        self.active_adapters: tuple = ()
        self._levels: tuple = ()
        self.add_adapter(adapter_name, ranks=ranks, lora_alpha=lora_alpha, use_rslora=use_rslora, levels=levels,
                         dropout=self.dropout, device=frozen.device,
                         dtype=(compute_dtype(_base_layer) if _base_layer is not None else frozen.dtype)
                         if dtype is None else dtype)
        self.set_active((adapter_name,))

    def add_adapter(self, name: str, *, ranks, lora_alpha, use_rslora: bool, levels, dropout: float, device,
                    dtype) -> None:
        """Give the layer another adapter's levels (inactive until set_active names it)."""
        if name in self.adapter_levels:
            raise ValueError(f"MSPLoraLinear: the layer already has an adapter named {name!r}")
        self.adapter_levels[name] = self._build_levels(name, ranks, lora_alpha, use_rslora, levels, device, dtype)
        self.adapter_dropout[name] = float(dropout)

    def remove_adapter(self, name: str) -> None:
        """Drop an adapter's levels (its own ones deregistered) and leave the rest active."""
        for i in range(len(self.adapter_levels.pop(name))):
            if own_level_key(name, i) in self.own_levels:
                del self.own_levels[own_level_key(name, i)]
        del self.adapter_dropout[name]
        self.set_active(tuple(n for n in self.active_adapters if n != name))

    def set_active(self, names) -> None:
        """Compute with the levels of the adapters `names` (those this layer has), their updates
        added. They must agree on dropout: the layer draws one mask."""
        if self.merged:
            raise ValueError("MSPLoraLinear.set_active: the layer has its adapter merged into the weight; unmerge "
                             "first")
        names = tuple(n for n in names if n in self.adapter_levels)
        dropouts = {self.adapter_dropout[n] for n in names}
        if len(dropouts) > 1:
            raise ValueError(f"MSPLoraLinear: adapters {list(names)} differ in dropout ({sorted(dropouts)}); adapters "
                             "active together on one layer share one dropout mask, so give them one dropout")
        self.active_adapters = names
        self._levels = tuple(lvl for n in names for lvl in self.adapter_levels[n])
        self.dropout = dropouts.pop() if dropouts else 0.0
        self.__dict__.pop("_joined_cache", None)

    def _build_levels(self, name, ranks, lora_alpha, use_rslora, levels, device, dtype) -> tuple:
        # A passed-in level brings its own rank; `ranks` fills the entries left None.
        given = list(levels) if levels is not None else [None] * len(ranks)
        n = len(given)
        if n == 0:
            raise ValueError("MSPLoraLinear: at least one level is needed; ranks is empty")
        if any(lvl is None for lvl in given) and len(ranks) != n:
            raise ValueError(f"MSPLoraLinear: levels has {n} entries but ranks has {len(ranks)}")
        alphas = _per_level(lora_alpha, n, "lora_alpha")
        refs = []
        for i, (alpha, lvl) in enumerate(zip(alphas, given)):
            if lvl is None:
                lvl = LoraLevel(self.in_features, self.out_features, ranks[i], alpha, use_rslora=use_rslora,
                                init_lora_weights=self.init_lora_weights,
                                device=device, dtype=dtype)
                self.own_levels[own_level_key(name, i)] = lvl
            elif (lvl.in_features, lvl.out_features) != (self.in_features, self.out_features):
                raise ValueError(
                    f"MSPLoraLinear: levels[{i}] is for ({lvl.in_features} -> {lvl.out_features}) but this layer is "
                    f"({self.in_features} -> {self.out_features})"
                )
            refs.append(lvl)
        # A plain tuple: nn.Module does not register its items, so shared levels stay owned by one module.
        return tuple(refs)

    @classmethod
    def from_linear(cls, linear: nn.Module, **kwargs) -> "MSPLoraLinear":
        """Wrap an existing nn.Linear, reusing (not copying) its weight and bias Parameters.

        A transformers Conv1D (GPT-2's) is taken too. Its weight, stored (in, out), is kept as it
        is (not copied): the kernels get the transposed view, which BLAS reads at no cost."""
        conv1d = is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"MSPLoraLinear.from_linear: expected nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        check_base_weight(linear, "MSPLoraLinear.from_linear", "linear")
        in_features, out_features = linear_features(linear)
        kwargs.setdefault("dtype", compute_dtype(linear))
        if quantized_kind(linear) is not None:
            return cls(in_features, out_features, bias=linear.bias is not None, _base_layer=linear,
                       device=linear.weight.device, **kwargs)
        weight = linear.weight
        layer = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            _weight=weight,
            _bias=linear.bias,
            device=weight.device,
            **kwargs,
        )
        layer.fan_in_fan_out = conv1d
        return layer

    @property
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out_features, in_features), a view for a Conv1D's (in, out) one."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def levels(self) -> tuple:
        return self._levels

    @property
    def ranks(self) -> tuple:
        return tuple(lvl.rank for lvl in self._levels)

    @property
    def scales(self) -> tuple:
        return tuple(lvl.scale for lvl in self._levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_only = self.merged or self.disabled or len(self._levels) == 0
        if not base_only and self._needs_no_autograd(x):
            return self._forward_without_autograd(x)
        if self.base_layer is not None:
            y = self.base_layer(x)
            if base_only:
                return y
            return msplora_add(y, x, [lvl.A for lvl in self._levels], [lvl.B for lvl in self._levels],
                               list(self.scales), dropout_p=self.dropout, training=self.training, backend=self.backend)
        if base_only:
            return nn.functional.linear(x, self.base_weight, self.bias)
        return msplora_linear(
            x,
            self.base_weight,
            self.bias,
            [lvl.A for lvl in self._levels],
            [lvl.B for lvl in self._levels],
            list(self.scales),
            dropout_p=self.dropout,
            training=self.training,
            backend=self.backend,
        )

    def _factors(self) -> list:
        # Read from the levels' parameter dicts: nn.Module's attribute lookup of a parameter costs
        # more than the rest of a one-token call's bookkeeping together.
        return [t for lvl in self._levels for t in (lvl._parameters["A"], lvl._parameters["B"])]

    def _needs_no_autograd(self, x: torch.Tensor) -> bool:
        """Whether this call can skip the autograd Function: no gradient can flow (grad mode off, or
        nothing involved requires one), no dropout draws, no autocast casts, and eager mode."""
        if (self.training and self.dropout > 0) or not isinstance(x, torch.Tensor):
            return False  # a non-tensor gets msplora_linear's error there
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in
                                                                (*self._factors(), self.weight, self.bias))):
            return False
        return not (torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling())

    def _joined_for(self, x: torch.Tensor) -> tuple:
        """The levels' factors joined in x's dtype (joined_factors), kept while the same factor
        tensors hold the same values: rebuilt after an optimizer step or any in-place change (their
        version counters), a .to() or a load (new tensors), or for another dtype. The factors are
        checked against the layer when they are joined, not on every call."""
        factors = self._factors()
        try:
            # Which tensors, their storage and versions: a new tensor (a load that assigns), new
            # data under the same Parameter (.to(), `p.data = ...`) or an in-place change; and any
            # optimizer step since. Writes through `p.data` by hand are not seen: join anew then with
            # a mode switch (.train() or .eval() drops the joined factors).
            key = (_optimizer_steps_so_far(), *[(id(t), t.data_ptr(), t._version) for t in factors])
        except RuntimeError:  # inference tensors keep no version: join anew each call
            key = None
        cached = self.__dict__.get("_joined_cache")
        if key is not None and cached is not None and cached[0] == (x.dtype, x.device) and cached[1] == key:
            return cached[3]
        As, Bs = factors[0::2], factors[1::2]
        if self.base_layer is None:
            check_inputs(x, self.base_weight, self.bias, As, Bs, list(self.scales), 0.0)
        with torch.no_grad():
            a, b = joined_factors(As, Bs, list(self.scales), x.dtype)
            joined = (a.t().contiguous(), b)  # a transposed, as add_joined_update takes it
        # The factors stay referenced with their ids, so that an id is never reused by another tensor.
        self.__dict__["_joined_cache"] = None if key is None else ((x.dtype, x.device), key, factors, joined)
        return joined

    def train(self, mode: bool = True):
        self.__dict__.pop("_joined_cache", None)
        return super().train(mode)

    def _forward_without_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus (x A) B with the levels joined once: evaluation and generation,
        where a token's GEMMs cost less than the Function's fixed per-call work. What the caller
        passes is checked on every call, as nn.Linear checks it, with the errors of msplora_linear."""
        inputs = x
        if self.base_layer is not None:
            y = self.base_layer(x)
            if y.dtype != x.dtype or y.device != x.device or y.shape[:-1] != x.shape[:-1]:
                # msplora_add's checks name what does not fit.
                return msplora_add(y, x, [lvl.A for lvl in self._levels], [lvl.B for lvl in self._levels],
                                   list(self.scales), backend=self.backend)
        else:
            # The parameter dict, not attribute lookups: at one token those cost as much as an op.
            w, bias = self._parameters["weight"], self._parameters.get("bias")
            w = w.t() if self.fan_in_fan_out else w
            if x.dim() < 1 or x.shape[-1] != self.in_features or x.dtype != w.dtype or x.device != w.device:
                check_inputs(x, w, bias, [lvl.A for lvl in self._levels], [lvl.B for lvl in self._levels],
                             list(self.scales), 0.0)
            if x.dim() > 2 and x.is_contiguous():
                # Flattened once, so that the three ops need no reshapes of their own.
                inputs = x.view(-1, x.shape[-1])
            y = nn.functional.linear(inputs, w, bias)
        a_t, b = self._joined_for(x)
        y = add_joined_update(y, inputs, a_t, b)
        return y if inputs is x else y.view(*x.shape[:-1], y.shape[-1])

    @property
    def frozen_dtype(self) -> torch.dtype:
        """The dtype of the frozen weight as the layer computes with it (a quantized one's compute dtype)."""
        return compute_dtype(self.base_layer) if self.base_layer is not None else self.weight.dtype

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The dense update sum_i s_i (A_i B_i)^T, shaped like weight (not transposed for a Conv1D's
        (in, out) weight) and typed like the frozen weight as the layer computes with it."""
        acc = torch.float64 if self.frozen_dtype == torch.float64 else torch.float32
        delta = reference.delta_weight([lvl.A.to(acc) for lvl in self._levels], [lvl.B.to(acc) for lvl in self._levels],
                                       self.scales)
        return (delta if self.fan_in_fan_out else delta.T).to(self.frozen_dtype)

    def _frozen_weight(self) -> torch.Tensor:
        return dequantized_weight(self.base_layer) if self.base_layer is not None else self.weight

    @torch.no_grad()
    def merge_is_finite(self, delta: Optional[torch.Tensor] = None) -> bool:
        """Whether weight + the update (delta_weight(), unless given) would hold only finite values
        (an adapter trained into NaN or inf would otherwise be folded in for good)."""
        return bool(torch.isfinite(self._frozen_weight() + (self.delta_weight() if delta is None else delta)).all())

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold the adapter into weight: forward becomes the base layer's alone. safe_merge, as in
        PEFT: first check that the merged weight is finite, and raise (merging nothing) if not. A
        quantized weight is dequantized, merged and quantized again, as PEFT does (with a warning:
        that adds rounding)."""
        if self.merged or len(self._levels) == 0:
            return
        delta = self.delta_weight()
        if safe_merge and not self.merge_is_finite(delta):
            raise ValueError("MSPLoraLinear.merge: the merged weight would hold NaN or inf (the adapter's update is "
                             "not finite); nothing was merged")
        if self.base_layer is not None:
            requantize(self.base_layer, self._frozen_weight() + delta.float())
        else:
            self.weight.add_(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.base_layer is not None:
            requantize(self.base_layer, self._frozen_weight() - self.delta_weight().float())
        else:
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def to_linear(self) -> nn.Module:
        """The plain layer over the same weight and bias (the adapter left out): an nn.Linear
        sharing the Parameters, for a layer made from a Conv1D a Conv1D again, and for a quantized
        base the quantized layer itself."""
        if self.base_layer is not None:
            return self.base_layer
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                conv = Conv1D(self.out_features, self.in_features)
            conv.weight = self.weight
            conv.bias = self.bias
            return conv
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        shared = [i for i, lvl in enumerate(self._levels) if lvl not in self.own_levels.values()]
        alphas = tuple(f"{lvl.alpha:g}" for lvl in self._levels)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={(self.base_layer or self).bias is not None}, "
            f"ranks={self.ranks}, alpha=({', '.join(alphas)}), dropout={self.dropout:g}, shared_levels={shared}"
            + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
            + (", merged=True" if self.merged else "")
        )
