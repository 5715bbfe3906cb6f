"""The op contract: the primitive ops every fused backend provides, written once.

Sizes are named: M rows (tokens), K in_features, N out_features, R the levels' total rank.
`a` is the levels' A factors side by side with their scales folded in (K x R), `b` their B
factors stacked (R x N). Every input is a 2-D tensor of one floating dtype on one device (bias
may be None; `seed` is an int64 tensor of one element, read only when p > 0). Every output is a
new row-major tensor in the inputs' dtype. The math of each op is reference.py's function of the
same name; csrc/msplora_ops.cpp declares the same schemas, and tests/test_op_contract.py holds
every backend to all of this.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    schema: str  # torch.library's, without the name
    inputs: dict  # tensor argument -> its shape in named sizes
    outputs: tuple  # each output's shape in named sizes
    math: str
    required: bool = True  # False: only backends with the matching capability provide it
    mask_inputs: dict = dataclasses.field(default_factory=dict)  # int32 packed-mask tensor argument -> shape
    mask_outputs: tuple = ()  # indices of the outputs that are int32 packed masks


# The dtypes the GPU kernels (cuda, triton) compute in: no float64 on tensor cores.
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# W = ceil(K / 32): a packed mask holds bit k % 32 of word k // 32 per row, set where dropout keeps
# element k of that row (bits past K are 0).
MASK_WORD_BITS = 32


OPS = (
    OpSpec("shrink", "(Tensor x, Tensor a, float p, Tensor seed) -> Tensor",
           {"x": ("M", "K"), "a": ("K", "R")}, (("M", "R"),), "T = dropout(x) a"),
    OpSpec("expand_linear", "(Tensor x, Tensor weight, Tensor? bias, Tensor t, Tensor b) -> Tensor",
           {"x": ("M", "K"), "weight": ("N", "K"), "bias": ("N",), "t": ("M", "R"), "b": ("R", "N")},
           (("M", "N"),), "y = x weight^T + bias + t b"),
    OpSpec("grad_t_b", "(Tensor dy, Tensor t, Tensor b) -> (Tensor, Tensor)",
           {"dy": ("M", "N"), "t": ("M", "R"), "b": ("R", "N")}, (("M", "R"), ("R", "N")),
           "(dT, dB) = (dy b^T, t^T dy)"),
    OpSpec("grad_x", "(Tensor dy, Tensor weight, Tensor dt, Tensor a, float p, Tensor seed) -> Tensor",
           {"dy": ("M", "N"), "weight": ("N", "K"), "dt": ("M", "R"), "a": ("K", "R")}, (("M", "K"),),
           "dx = dy weight + mask * (dt a^T)"),
    OpSpec("grad_a", "(Tensor x, Tensor dt, float p, Tensor seed) -> Tensor",
           {"x": ("M", "K"), "dt": ("M", "R")}, (("K", "R"),), "dA = dropout(x)^T dt"),
    # No training path calls it: the tests read each backend's mask through it, to hold every
    # backend to the reference's mask bit for bit.
    OpSpec("dropout_mask", "(Tensor x, float p, Tensor seed) -> Tensor",
           {"x": ("M", "K")}, (("M", "K"),), "the multiplier dropout applies to x: 0 or 1 / (1 - p)", required=False),
    OpSpec("dropout", "(Tensor x, float p, Tensor seed) -> Tensor",
           {"x": ("M", "K")}, (("M", "K"),), "dropout(x), a new tensor even at p = 0"),
    OpSpec("shrink_expand_linear",
           "(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, float p, Tensor seed) -> (Tensor, Tensor)",
           {"x": ("M", "K"), "weight": ("N", "K"), "bias": ("N",), "a": ("K", "R"), "b": ("R", "N")},
           (("M", "N"), ("M", "R")), "(y, T) with T = dropout(x) a, y = x weight^T + bias + T b", required=False),
    # One mask pass: the forward's shrink packs the mask it draws, and the backward reads it
    # instead of hashing every element again (the keeps_mask_bits capability).
    OpSpec("shrink_keep_mask", "(Tensor x, Tensor a, float p, Tensor seed) -> (Tensor, Tensor)",
           {"x": ("M", "K"), "a": ("K", "R")}, (("M", "R"), ("M", "W")), "(T, bits): T = dropout(x) a, bits its mask",
           required=False, mask_outputs=(1,)),
    OpSpec("grad_x_bits", "(Tensor dy, Tensor weight, Tensor dt, Tensor a, Tensor bits, float p) -> Tensor",
           {"dy": ("M", "N"), "weight": ("N", "K"), "dt": ("M", "R"), "a": ("K", "R")}, (("M", "K"),),
           "dx = dy weight + mask(bits) * (dt a^T)", required=False, mask_inputs={"bits": ("M", "W")}),
    OpSpec("grad_a_bits", "(Tensor x, Tensor dt, Tensor bits, float p) -> Tensor",
           {"x": ("M", "K"), "dt": ("M", "R")}, (("K", "R"),), "dA = (mask(bits) * x)^T dt", required=False,
           mask_inputs={"bits": ("M", "W")}),
    # A backend that keeps dropout(x) for dA and the packed mask for dx draws both in one pass
    # (keeps_dropped_input and keeps_mask_bits together).
    OpSpec("dropout_keep_mask", "(Tensor x, float p, Tensor seed) -> (Tensor, Tensor)",
           {"x": ("M", "K")}, (("M", "K"), ("M", "W")), "(dropout(x), its mask packed)", required=False,
           mask_outputs=(1,)),
)
SPECS = {spec.name: spec for spec in OPS}
REQUIRED = tuple(spec.name for spec in OPS if spec.required)


def arg_names(spec: OpSpec) -> list[str]:
    inside = spec.schema[1 : spec.schema.index(") ->")]
    return [part.split()[-1] for part in inside.split(",")]


def bind(name: str, args) -> dict:
    """Check a call of op `name` against the contract and return its named sizes; raises
    TypeError or ValueError that names the argument and the shapes it got."""
    spec = SPECS[name]
    values = dict(zip(arg_names(spec), args))
    sizes: dict[str, int] = {}
    first = None
    for arg, dims in spec.inputs.items():
        t = values[arg]
        if t is None and arg == "bias":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"msplora op {name}: {arg} must be a floating-point tensor, got {got}")
        if t.dim() != len(dims):
            raise ValueError(f"msplora op {name}: {arg} must be {len(dims)}-D {dims}, got shape {tuple(t.shape)}")
        if first is None:
            first = (arg, t)
        elif t.dtype != first[1].dtype or t.device != first[1].device:
            raise ValueError(f"msplora op {name}: {arg} is {t.dtype} on {t.device} but {first[0]} is "
                             f"{first[1].dtype} on {first[1].device}")
        for dim, size in zip(dims, t.shape):
            if sizes.setdefault(dim, size) != size:
                shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in values.items()
                                   if isinstance(v, torch.Tensor) and k in spec.inputs)
                raise ValueError(f"msplora op {name}: {arg} has {dim} = {size} but another argument has "
                                 f"{dim} = {sizes[dim]} ({shapes})")
    for arg, dims in spec.mask_inputs.items():
        t = values[arg]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != len(dims):
            got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"msplora op {name}: {arg} must be a 2-D int32 packed mask {dims}, got {got}")
        want = (sizes["M"], -(-sizes["K"] // MASK_WORD_BITS))
        if tuple(t.shape) != want or t.device != first[1].device:
            raise ValueError(f"msplora op {name}: {arg} must have shape (M, ceil(K / 32)) = {want} on "
                             f"{first[1].device}, got {tuple(t.shape)} on {t.device}")
    if spec.mask_inputs or spec.mask_outputs:
        sizes["W"] = -(-sizes["K"] // MASK_WORD_BITS)
    if "p" in values:
        p = values["p"]
        if not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
            raise ValueError(f"msplora op {name}: p must be in [0, 1), got {p!r}")
        seed = values.get("seed")
        if "seed" in values and p > 0 and not (isinstance(seed, torch.Tensor) and seed.numel() == 1 and seed.dtype == torch.int64):
            got = (seed.dtype, tuple(seed.shape)) if isinstance(seed, torch.Tensor) else type(seed).__name__
            raise ValueError(f"msplora op {name}: seed must be an int64 tensor of one element when p > 0, got {got}")
    return sizes


def empty_outputs(name: str, args):
    """New row-major outputs of the contract's shapes, like the first tensor input: the fake kernels."""
    sizes = bind(name, args)
    like = next(a for a in args if isinstance(a, torch.Tensor))
    spec = SPECS[name]
    outs = tuple(like.new_empty(tuple(sizes[d] for d in dims), dtype=torch.int32 if i in spec.mask_outputs else None)
                 for i, dims in enumerate(spec.outputs))
    return outs[0] if len(outs) == 1 else outs
