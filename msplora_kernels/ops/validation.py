"""Argument checks for msplora_linear: clear Python errors before any kernel runs."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ..errors import DtypeMismatchError


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_tensor(name: str, t, ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"msplora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"msplora_linear: {name} must be floating point, got dtype {t.dtype} (shape {_shape(t)})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"msplora_linear: {name} must be {ndim}-D, got shape {_shape(t)}")


def check_dropout_p(dropout_p) -> None:
    if not isinstance(dropout_p, numbers.Real) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"msplora_linear: dropout_p must be a float in [0, 1), got {dropout_p!r}")


# Signatures of the argument sets check_inputs has passed: a layer's next call usually repeats
# its last one, and the full checks cost more than the kernels of a small layer.
_PASSED: set = set()
_PASSED_MAX = 4096


def _meta(t) -> tuple:
    return (type(t), t.shape, t.dtype, t.device)


def _signature(x, weight, bias, As, Bs, scales, dropout_p, same_dtype) -> Optional[tuple]:
    """Everything the checks read (each tensor's type, shape, dtype and device; x's only through
    its width), or None where an argument is not what a signature can describe."""
    try:
        tensors = tuple(_meta(t) for t in (*As, *Bs)) if isinstance(As, (list, tuple)) and isinstance(Bs, (list, tuple)) else None
        if tensors is None or not isinstance(scales, (list, tuple)):
            return None
        return (type(x), x.dim(), x.shape[-1], x.dtype, x.device, _meta(weight), None if bias is None else _meta(bias),
                tensors, tuple((type(s), s) for s in scales), type(dropout_p), dropout_p, same_dtype)
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None


def check_inputs(x, weight, bias, As, Bs, scales, dropout_p, same_dtype: bool = True) -> None:
    """Raise TypeError/ValueError naming the argument and the shapes it got.

    same_dtype=False skips the x/weight dtype match (autocast will cast them). A signature that
    passed before is not checked again.
    """
    if torch.compiler.is_compiling():  # checked once, at trace time; no global state in the graph
        _check_all(x, weight, bias, As, Bs, scales, dropout_p, same_dtype)
        return
    signature = _signature(x, weight, bias, As, Bs, scales, dropout_p, same_dtype)
    if signature is not None and signature in _PASSED:
        return
    _check_all(x, weight, bias, As, Bs, scales, dropout_p, same_dtype)
    if signature is not None:
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.clear()
        _PASSED.add(signature)


def _check_all(x, weight, bias, As, Bs, scales, dropout_p, same_dtype: bool) -> None:
    _check_tensor("x", x)
    _check_tensor("weight", weight, ndim=2)
    if x.dim() < 1:
        raise ValueError(f"msplora_linear: x must have at least 1 dimension, got shape {_shape(x)}")
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"msplora_linear: x has last dimension {x.shape[-1]} (shape {_shape(x)}) but weight has "
            f"shape {_shape(weight)}, so in_features is {in_features}"
        )
    if bias is not None:
        _check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != out_features:
            raise ValueError(
                f"msplora_linear: bias has shape {_shape(bias)} but weight has shape {_shape(weight)}; "
                f"expected ({out_features},)"
            )
    check_levels(As, Bs, scales, in_features, out_features, f"weight {_shape(weight)}")
    check_dropout_p(dropout_p)
    check_devices(x, [("weight", weight)] + ([("bias", bias)] if bias is not None else []), As, Bs)
    if same_dtype:
        check_same_dtype(x, weight, bias)


def check_devices(x, named, As, Bs) -> None:
    """Every tensor on x's device."""
    named = list(named) + [(f"As[{i}]", a) for i, a in enumerate(As)] + [(f"Bs[{i}]", b) for i, b in enumerate(Bs)]
    for name, t in named:
        if t.device != x.device:
            raise ValueError(
                f"msplora_linear: {name} is on {t.device} but x is on {x.device}; move them to one device"
            )


def check_levels(As, Bs, scales, in_features: int, out_features: int, base: str) -> None:
    """Each level's A (in_features, r) and B (r, out_features), and a finite scale; `base` names
    what fixed the features, for the messages."""
    for name, seq in (("As", As), ("Bs", Bs), ("scales", scales)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"msplora_linear: {name} must be a list or tuple, got {type(seq).__name__}")
    if not (len(As) == len(Bs) == len(scales)):
        raise ValueError(
            f"msplora_linear: As, Bs and scales must have the same length, got {len(As)}, {len(Bs)} and {len(scales)}"
        )
    if len(As) == 0:
        raise ValueError("msplora_linear: at least one level is needed; As, Bs and scales are empty")
    for i, (a, b, s) in enumerate(zip(As, Bs, scales)):
        _check_tensor(f"As[{i}]", a, ndim=2)
        _check_tensor(f"Bs[{i}]", b, ndim=2)
        if a.shape[0] != in_features:
            raise ValueError(
                f"msplora_linear: As[{i}] has shape {_shape(a)} but in_features is {in_features} "
                f"({base}); expected ({in_features}, r)"
            )
        if a.shape[1] < 1:
            raise ValueError(f"msplora_linear: As[{i}] has shape {_shape(a)}; rank must be >= 1")
        if b.shape[0] != a.shape[1]:
            raise ValueError(
                f"msplora_linear: rank mismatch at level {i}: As[{i}] has shape {_shape(a)} "
                f"(rank {a.shape[1]}) but Bs[{i}] has shape {_shape(b)} (rank {b.shape[0]})"
            )
        if b.shape[1] != out_features:
            raise ValueError(
                f"msplora_linear: Bs[{i}] has shape {_shape(b)} but out_features is {out_features} "
                f"({base}); expected ({b.shape[0]}, {out_features})"
            )
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            raise TypeError(f"msplora_linear: scales[{i}] must be a finite float, got {s!r}")


def check_add_inputs(y, x, As, Bs, scales, dropout_p) -> None:
    """msplora_add's arguments: y (..., out_features) the base's output for x (..., in_features)."""
    _check_tensor("x", x)
    _check_tensor("y", y)
    if x.dim() < 1 or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"msplora_add: y has shape {_shape(y)} but x has shape {_shape(x)}; y must be the base "
                         "layer's output for x (the same leading dimensions)")
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"msplora_add: y is {y.dtype} on {y.device} but x is {x.dtype} on {x.device}")
    check_levels(As, Bs, scales, x.shape[-1], y.shape[-1], f"x {_shape(x)}, y {_shape(y)}")
    check_dropout_p(dropout_p)
    check_devices(x, [], As, Bs)


def check_same_dtype(x, weight, bias) -> None:
    """x, weight and bias share one dtype, as nn.Linear requires."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            # nn.Linear's own message, with the argument named.
            raise DtypeMismatchError(
                f"expected m1 and m2 to have the same dtype, but got: {x.dtype} != {t.dtype} "
                f"(msplora_linear: x is {x.dtype}, {name} is {t.dtype})"
            )
