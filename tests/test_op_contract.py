"""Every backend's op table against the op contract (msplora_kernels/ops/contract.py) and the
reference's ops: schemas, output shapes, dtypes and layouts, values, bad arguments, and the
dropout hash's constants in every copy of it."""
import re
from pathlib import Path

import pytest
import torch

import msplora_kernels as mk
from msplora_kernels.ops import contract, native, reference
from msplora_kernels.ops.backends import BACKENDS

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = mk.available_backends("cpu")
# Sizes off every block multiple, so that ragged tiles are exercised.
SIZES = {"M": 37, "K": 45, "N": 29, "R": 11}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2}


def contract_args(name, dtype, p):
    """Random arguments of op `name` with the contract's shapes (bias given)."""
    spec = contract.SPECS[name]
    values = [torch.randn(*(SIZES[d] for d in dims), dtype=dtype) / 3 for dims in spec.inputs.values()]
    by_name = dict(zip(spec.inputs, values))
    for arg in spec.mask_inputs:  # a random packed mask: every bit pattern, some words negative
        words = -(-SIZES["K"] // contract.MASK_WORD_BITS)
        keep = torch.rand(SIZES["M"], SIZES["K"]) > 0.3
        by_name[arg] = reference.pack_mask(keep)
        assert by_name[arg].shape == (SIZES["M"], words)
    seed = torch.tensor([424242], dtype=torch.int64)
    args = []
    for arg in contract.arg_names(spec):
        args.append(by_name[arg] if arg in by_name else p if arg == "p" else seed)
    return args


def _compare(name, got, want, dtype):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, contract {tuple(want.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, inputs {dtype}"
    assert got.is_contiguous(), f"{name}: not row-major, strides {got.stride()}"
    tol = TOL[dtype] * (1 + want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


def check_op_table(ops, backend_dtypes, names=contract.REQUIRED):
    for dtype in [d for d in TOL if backend_dtypes is None or d in backend_dtypes]:
        for name in names:
            for p in ((0.0, 0.3) if "p" in contract.arg_names(contract.SPECS[name]) else (0.0,)):
                args = contract_args(name, dtype, p)
                got = getattr(ops, name)(*args)
                want = getattr(reference, name)(*args)
                fake = contract.empty_outputs(name, args)
                got, want, fake = [v if isinstance(v, tuple) else (v,) for v in (got, want, fake)]
                assert len(got) == len(want) == len(contract.SPECS[name].outputs), name
                for i, (g, w, f) in enumerate(zip(got, want, fake)):
                    assert g.shape == f.shape and g.stride() == f.stride(), f"{name}: fake kernel disagrees"
                    assert g.dtype == f.dtype, f"{name}[{i}]: dtype {g.dtype}, fake kernel {f.dtype}"
                    assert all(g.data_ptr() != a.data_ptr() for a in args if isinstance(a, torch.Tensor)), name
                    if i in contract.SPECS[name].mask_outputs:  # a packed mask: bit for bit
                        assert torch.equal(g, w), f"{name}[{i}] p={p}: packed mask differs"
                    else:
                        _compare(f"{name}[{i}] {dtype} p={p}", g, w.to(dtype), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_cpu_backend_follows_the_contract(backend):
    b = BACKENDS[backend]
    # Every op the backend provides: the required ones and its optional ones.
    names = [spec.name for spec in contract.OPS if hasattr(b.ops, spec.name)]
    assert set(contract.REQUIRED) <= set(names), backend
    check_op_table(b.ops, b.dtypes, names)


def test_the_cuda_launchers_follow_the_contract(emulated_cuda_ops):
    check_op_table(emulated_cuda_ops, BACKENDS["cuda"].dtypes)


def _check_schemas(namespace: str, provided):
    assert set(contract.REQUIRED) <= set(provided), namespace
    for name in provided:
        got = str(getattr(getattr(torch.ops, namespace), name).default._schema)
        assert got == f"{namespace}::{name}{contract.SPECS[name].schema}"


def test_the_compiled_schemas_are_the_contracts():
    _check_schemas("msplora", native.provided())
    assert "dropout_keep_mask" in native.provided()  # the cpp backend's one mask pass


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="needs triton under the interpreter")
def test_the_triton_schemas_are_the_contracts():
    from msplora_kernels.ops import triton_ops

    _check_schemas("msplora_triton", triton_ops.PROVIDED)


def test_optional_ops_come_with_their_capability():
    # An optional op is used only by a backend whose capability asks for it (autograd.py).
    for name, b in BACKENDS.items():
        if name in CPU_BACKENDS and not hasattr(b.ops, "shrink_expand_linear"):
            assert not b.one_pass_forward(1), name
        if b.keeps_mask_bits:
            assert all(hasattr(b.ops, op) for op in ("shrink_keep_mask", "grad_x_bits", "grad_a_bits")), name
            if b.keeps_dropped_input:
                assert hasattr(b.ops, "dropout_keep_mask"), name


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_bad_arguments_are_refused_by_every_op_table(backend):
    ops = BACKENDS[backend].ops
    x, a = torch.randn(8, 16), torch.randn(15, 3)
    with pytest.raises((RuntimeError, ValueError), match="15"):
        ops.shrink(x, a, 0.0, torch.tensor([1]))
    dy, t, b = torch.randn(8, 12), torch.randn(8, 3), torch.randn(4, 12)
    with pytest.raises((RuntimeError, ValueError), match="4"):
        ops.grad_t_b(dy, t, b)


def test_the_contract_names_the_argument_and_the_shapes():
    x, a = torch.randn(8, 16), torch.randn(15, 3)
    with pytest.raises(ValueError, match=r"a has K = 15 but another argument has K = 16 \(x \(8, 16\), a \(15, 3\)\)"):
        contract.bind("shrink", (x, a, 0.0, torch.tensor([1])))
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        contract.bind("dropout", (torch.ones(2, 2, dtype=torch.int64), 0.1, torch.tensor([1])))
    with pytest.raises(ValueError, match="seed must be an int64 tensor of one element"):
        contract.bind("dropout", (torch.ones(2, 2), 0.1, torch.tensor([1.0])))
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        contract.bind("dropout", (torch.ones(2, 2), 1.0, torch.tensor([1])))
    # A packed mask must be int32 words of the input's rows and ceil(K / 32) columns.
    x, dt = torch.randn(8, 70), torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"bits must have shape \(M, ceil\(K / 32\)\) = \(8, 3\) .* got \(8, 2\)"):
        contract.bind("grad_a_bits", (x, dt, torch.zeros(8, 2, dtype=torch.int32), 0.1))
    with pytest.raises(TypeError, match="bits must be a 2-D int32 packed mask"):
        contract.bind("grad_a_bits", (x, dt, torch.zeros(8, 3), 0.1))


def _hex_constants(text):
    return [int(h, 16) for h in re.findall(r"0x([0-9A-Fa-f]{16})", text)]


def _shifts(text):
    return [int(s) for s in re.findall(r"z \^ \(z >> (\d+)\)", text)]


@pytest.mark.parametrize("path", ["csrc/dropout_hash.h", "triton_kernels/kernels.py"])
def test_every_copy_of_the_hash_has_the_references_constants(path):
    text = (ROOT / path).read_text()
    assert _hex_constants(text) == [reference.HASH_WEYL, reference.HASH_MIX1, reference.HASH_MIX2], path
    assert _shifts(text) == list(reference.HASH_SHIFTS), path
    assert f">> {64 - reference.UNIFORM_BITS}" in text and f"{float(1 << reference.UNIFORM_BITS):.1f}" in text, path


def test_the_reference_hash_is_splitmix64():
    # The first outputs of splitmix64 with state 0 (index i = i-th Weyl step for seed 1), as
    # published with the generator: the reference's integer arithmetic is exact.
    def mix(z):
        m = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * reference.HASH_MIX1) & m
        z = ((z ^ (z >> 27)) * reference.HASH_MIX2) & m
        return z ^ (z >> 31)

    seed, cols = 12345, 7
    flags = reference.keep_flags(seed, 3, cols, 0.5)
    for index in range(3 * cols):
        z = mix((index + seed * reference.HASH_WEYL) & ((1 << 64) - 1))
        want = (z >> 40) / float(1 << 24) >= 0.5
        assert bool(flags.view(-1)[index]) == want, index
    assert mix(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF  # splitmix64's first output from state 0
