"""Triton-specific paths on the CPU under TRITON_INTERPRET=1: wide ranks, dtype refusal, opcheck."""
import pytest
import torch

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem

pytestmark = pytest.mark.skipif(
    "triton" not in mk.available_backends("cpu"), reason="triton is not importable or TRITON_INTERPRET is not 1"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_total_rank_above_one_rank_block(dtype):
    # R = 150 > 128 spans two rank blocks in every kernel.
    problem = make_problem((45,), 36, 20, (100, 40, 10), dtype)
    check_backend_against_reference("triton", problem, dropout_p=0.2, training=True, rng_seed=3)


def test_rows_split_across_programs_in_grad_a():
    # Enough rows that the dA reduction is split over several programs that meet by atomics.
    problem = make_problem((1000,), 16, 8, (5, 3), torch.float32)
    check_backend_against_reference("triton", problem)


def test_float64_is_refused_by_name_and_skipped_by_automatic_choice():
    x, w, b, As, Bs, s = make_problem((3,), 8, 8, (2,), torch.float64)
    with pytest.raises(TypeError, match="backend='triton' computes in"):
        mk.msplora_linear(x, w, b, As, Bs, s, backend="triton")
    from msplora_kernels.backends import resolve_backend

    assert resolve_backend(None, "cpu", torch.float64) != "triton"


def test_opcheck_schema_triton_ops():
    # Fake-tensor and AOT checks need compiled kernels (the interpreter touches real
    # data pointers); tests/test_gpu.py runs the full opcheck on a GPU.
    from msplora_kernels.triton_kernels import ops

    x, a = torch.randn(40, 24), torch.randn(24, 7)
    seed = torch.tensor([5], dtype=torch.int64)
    w, b, bias = torch.randn(20, 24), torch.randn(7, 20), torch.randn(20)
    t = ops.shrink(x, a, 0.0, seed)
    dy = torch.randn(40, 20)
    dt, _ = ops.grad_t_b(dy, t, b)
    cases = [
        (torch.ops.msplora_triton.shrink, (x, a, 0.3, seed)),
        (torch.ops.msplora_triton.expand_linear, (x, w, bias, t, b)),
        (torch.ops.msplora_triton.grad_t_b, (dy, t, b)),
        (torch.ops.msplora_triton.grad_x, (dy, w, dt, a, 0.3, seed)),
        (torch.ops.msplora_triton.grad_a, (x, dt, 0.3, seed)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema",))
