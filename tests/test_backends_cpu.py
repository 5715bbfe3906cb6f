"""Every CPU backend against the reference: forward and all gradients."""
import pytest
import torch

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem, precise_dtype

CPU_BACKENDS = [b for b in mk.available_backends("cpu") if b != "torch"] + ["torch"]


def _dtypes(backend):
    # Triton's interpreter miscomputes bf16 tl.dot; bf16 Triton runs in the GPU tests.
    return [torch.float32, torch.float16] if backend == "triton" else [torch.float64, torch.float32, torch.bfloat16]


def _cases():
    for backend in CPU_BACKENDS:
        for dtype in _dtypes(backend):
            yield pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}")


def test_cpp_backend_is_built():
    assert "cpp" in mk.available_backends("cpu"), "the compiled extension did not load"


@pytest.mark.parametrize("backend,dtype", list(_cases()))
@pytest.mark.parametrize(
    "ranks",
    [(8, 4, 2), (5,), (7, 3), (6, 5, 3, 1), (14, 9, 2)],
    ids=lambda r: "r" + "-".join(map(str, r)),
)
def test_matches_reference_levels_and_odd_ranks(backend, dtype, ranks):
    problem = make_problem((2, 19), 40, 24, ranks, dtype)
    check_backend_against_reference(backend, problem)


@pytest.mark.parametrize("backend,dtype", list(_cases()))
@pytest.mark.parametrize("lead", [(37,), (2, 3, 7), (1,)], ids=lambda s: "lead" + "x".join(map(str, s)))
def test_leading_dims_and_odd_sizes(backend, dtype, lead):
    problem = make_problem(lead, 33, 17, (8, 4, 2), dtype)
    check_backend_against_reference(backend, problem)


@pytest.mark.parametrize("backend,dtype", list(_cases()))
def test_noncontiguous_input(backend, dtype):
    problem = make_problem((3, 11), 24, 20, (8, 4, 2), dtype, noncontig=True)
    assert not problem[0].is_contiguous()
    check_backend_against_reference(backend, problem)


@pytest.mark.parametrize("backend,dtype", list(_cases()))
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trained"])
def test_weight_stored_in_out(backend, dtype, train_base):
    # A Conv1D base (GPT-2) hands the ops the transposed view of its (in, out) weight.
    problem = make_problem((3, 7), 24, 40, (8, 4, 2), dtype, weight_in_out=True, train_base=train_base)
    assert not problem[1].is_contiguous()
    check_backend_against_reference(backend, problem, dropout_p=0.2, training=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["0", "2x0"])
def test_empty_batch(backend, lead):
    x, w, b, As, Bs, scales = make_problem(lead, 16, 12, (4, 2, 1), torch.float32)
    y = mk.msplora_linear(x, w, b, As, Bs, scales, backend=backend)
    assert y.shape == (*lead, 12)
    y.sum().backward()
    assert x.grad.shape == x.shape
    # No rows: the factor gradients exist and are exactly zero.
    assert all(a.grad is not None and a.grad.abs().sum() == 0 for a in As)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_base_weight_and_bias_gradients_when_trained(backend, bias, p):
    # With dropout the base's gradient needs x itself, beside the dropped x the cpp path keeps.
    problem = make_problem((2, 9), 20, 28, (6, 3, 1), precise_dtype(backend), bias=bias, train_base=True)
    _, grads = check_backend_against_reference(backend, problem, dropout_p=p, training=True)
    assert "weight" in grads and (("bias" in grads) == bias)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_adapter_still_gives_input_gradient(backend):
    x, w, b, As, Bs, scales = make_problem((5,), 12, 10, (4, 2), precise_dtype(backend))
    for t in As + Bs:
        t.requires_grad_(False)
    check_backend_against_reference(backend, (x, w, b, As, Bs, scales))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("frozen", [("As", 0), ("Bs", 2), ("As", 1, "Bs", 1)], ids=["A0", "B2", "A1B1"])
def test_partly_frozen_factors(backend, frozen):
    # The Function splits dA and dB per level; frozen levels get none, the others theirs.
    x, w, b, As, Bs, scales = make_problem((3, 5), 18, 14, (5, 3, 2), precise_dtype(backend))
    named = {"As": As, "Bs": Bs}
    for group, index in zip(frozen[::2], frozen[1::2]):
        named[group][index].requires_grad_(False)
    _, grads = check_backend_against_reference(backend, (x, w, b, As, Bs, scales), dropout_p=0.3, training=True)
    assert all(f"{group}[{index}]" not in grads for group, index in zip(frozen[::2], frozen[1::2]))
    assert len(grads) == 1 + 6 - len(frozen) // 2


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])  # triton has no float64
def test_gradcheck_float64(backend):
    x, w, b, As, Bs, scales = make_problem((3, 4), 10, 7, (3, 2, 1), torch.float64, train_base=True)
    n = len(As)

    def f(x, w, b, *factors):
        return mk.msplora_linear(x, w, b, list(factors[:n]), list(factors[n:]), scales, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b, *As, *Bs), eps=1e-6, atol=1e-7)
