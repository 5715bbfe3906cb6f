"""Our bf16 kernels for the thin products (csrc/cpu/thin_product.h), which the cpp backend may run
on CPUs with AVX512-BF16: the shrink x A, dT = dy B^T with dB = T^T dy in one pass over dy, and
dA = x^T dT (or dB alone, where the pass is not chosen) with the thin factor on the left.
Forced through cpu_gemm=fused, against float64, at ragged sizes (widths not a multiple of the
32-element vector, odd token counts, every rank up to 16)."""
import pytest
import torch

import msplora_kernels as mk
from helpers import HAS_BF16_DOT
from msplora_kernels.ops import settings
from msplora_kernels.ops.native import gemm_choices

pytestmark = [
    pytest.mark.skipif("cpp" not in mk.available_backends("cpu"), reason="needs the compiled cpp backend"),
    pytest.mark.skipif(not HAS_BF16_DOT, reason="the kernel runs only where the CPU has AVX512-BF16"),
]
SEED = torch.tensor([5], dtype=torch.int64)


def _assert_bf16_product(got, a, b, what):
    # One bf16 rounding of the output plus fp32 accumulation: within 2^-7 of sum |a||b| per element.
    a64, b64 = a.double(), b.double()
    err = (got.double() - a64 @ b64).abs()
    bound = 2.0 ** -7 * (a64.abs() @ b64.abs()) + 1e-30
    assert got.dtype == torch.bfloat16 and got.is_contiguous(), what
    assert (err <= bound).all(), f"{what}: worst error {(err / bound).max().item():.2f}x the bound"


def _chosen(lines, gemm):
    [line] = [line for line in lines if line.startswith(gemm)]
    return line.split(" -> ")[1].split(" ")[0]


@pytest.mark.parametrize("tokens,in_f,out_f,rank", [(1, 32, 40, 1), (3, 45, 33, 7), (33, 77, 96, 14),
                                                      (64, 800, 70, 16), (17, 1000, 50, 15), (50, 333, 45, 12),
                                                      (40, 96, 64, 11),  # either side of the ranks-in-lanes kernel's threshold
                                                      (9001, 40, 64, 14)])  # dy in 3 chunks of rows, the last odd
def test_shrink_and_the_one_pass_gradients_run_our_kernels_and_match_float64(tokens, in_f, out_f, rank):
    x = torch.randn(tokens, in_f).bfloat16()
    a = torch.randn(in_f, rank).bfloat16()
    dy, b, t = torch.randn(tokens, out_f).bfloat16(), torch.randn(rank, out_f).bfloat16(), torch.randn(tokens, rank).bfloat16()
    ops = torch.ops.msplora
    torch.ops.msplora.forget_gemm_choices()
    with settings.overridden(cpu_gemm="fused"):
        shrunk = ops.shrink(x, a, 0.0, SEED)
        dt, db = ops.grad_t_b(dy, t, b)
        da = ops.grad_a(dy, t, 0.0, SEED)  # dy standing in for x: (tokens, out_f)
        lines = gemm_choices()
    assert _chosen(lines, "shrink: x A") == "thin", lines
    assert _chosen(lines, "grad: dT and dB in one pass over dy") == "thin", lines
    assert _chosen(lines, "grad: dA = x^T dT") == "thin", lines
    _assert_bf16_product(shrunk, x, a, "shrink")
    _assert_bf16_product(dt, dy, b.t(), "dT")
    _assert_bf16_product(db, t.t(), dy, "dB")
    _assert_bf16_product(da, dy.t(), t, "dA")


def test_the_shrink_with_dropout_multiplies_the_dropped_input():
    x, a = torch.randn(50, 300).bfloat16(), torch.randn(300, 14).bfloat16()
    with settings.overridden(cpu_gemm="fused"):
        shrunk = torch.ops.msplora.shrink(x, a, 0.3, SEED)
    dropped = torch.ops.msplora.dropout(x, 0.3, SEED)
    assert (dropped == 0).any() and (dropped != 0).any()
    _assert_bf16_product(shrunk, dropped, a, "shrink with dropout")


def test_auto_times_our_kernel_only_where_it_applies():
    layer = mk.MSPLoraLinear(512, 384, ranks=(8, 4, 2), dropout=0.1, backend="cpp", dtype=torch.bfloat16).train()
    x = torch.randn(256, 512, dtype=torch.bfloat16, requires_grad=True)
    torch.ops.msplora.forget_gemm_choices()
    layer(x).sum().backward()
    lines = gemm_choices()
    for line in lines:
        offered = "thin " in line.split(" -> ")[1]
        # Every thin product is offered ours (dT's and dB's own products are timed inside the
        # separate candidate); the full-width and frozen ones are not.
        assert offered == line.startswith(("shrink: x A", "grad: dT = dy B^T", "grad: dB = T^T dy",
                                           "grad: dT and dB in one pass", "grad: dA = x^T dT")), line
    # Wider than 16 ranks, or fp32: not offered.
    torch.ops.msplora.forget_gemm_choices()
    torch.ops.msplora.shrink(torch.randn(64, 256).bfloat16(), torch.randn(256, 17).bfloat16(), 0.0, SEED)
    torch.ops.msplora.shrink(torch.randn(64, 256), torch.randn(256, 8), 0.0, SEED)
    assert not any("thin" in line for line in gemm_choices())


@pytest.mark.parametrize("tokens,in_f,out_f,rank", [(7, 40, 33, 5), (33, 64, 77, 14), (130, 96, 50, 1),
                                                      (65, 48, 100, 33),  # odd ranks, columns past the 32-wide tile
                                                      (20, 64, 70, 112)])  # llama2-7b's total rank
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_the_bf16_expand_adds_into_the_frozen_output_and_matches_float64(tokens, in_f, out_f, rank, p):
    # csrc/cpu/expand_bf16.h, forced: y = x W^T + b + T B, dx = dy W + mask * (dT A^T) with the
    # mask hashed from the seed (grad_x) or from packed bits (grad_x_bits).
    x, w, bias = torch.randn(tokens, in_f).bfloat16(), torch.randn(out_f, in_f).bfloat16(), torch.randn(out_f).bfloat16()
    a, b = torch.randn(in_f, rank).bfloat16(), torch.randn(rank, out_f).bfloat16()
    t, dt, dy = torch.randn(tokens, rank).bfloat16(), torch.randn(tokens, rank).bfloat16(), torch.randn(tokens, out_f).bfloat16()
    ops = torch.ops.msplora
    torch.ops.msplora.forget_gemm_choices()
    with settings.overridden(cpu_gemm="fused"):
        y = ops.expand_linear(x, w, bias, t, b)
        dx = ops.grad_x(dy, w, dt, a, p, SEED)
        _, bits = ops.dropout_keep_mask(x, p, SEED)
        dx_bits = ops.grad_x_bits(dy, w, dt, a, bits, p)
        mask = ops.dropout_mask(x, p, SEED).double()
        lines = gemm_choices()
    dx_term = "grad: mask * (dT A^T)" if p > 0 else "grad: dT A^T"
    assert _chosen(lines, "expand: T B") == "fused" and _chosen(lines, dx_term) == "fused", lines
    # Two bf16 roundings (the frozen GEMM's output, then the sum) over fp32 accumulation.
    x64, w64, t64, b64, dt64, a64, dy64 = (v.double() for v in (x, w, t, b, dt, a, dy))
    want_y = x64 @ w64.t() + bias.double() + t64 @ b64
    bound_y = 2.0 ** -6 * (x64.abs() @ w64.abs().t() + bias.double().abs() + t64.abs() @ b64.abs())
    assert ((y.double() - want_y).abs() <= bound_y).all(), "y"
    want_dx = dy64 @ w64 + mask * (dt64 @ a64.t())
    bound_dx = 2.0 ** -6 * (dy64.abs() @ w64.abs() + mask * (dt64.abs() @ a64.abs().t()))
    for got, what in ((dx, "dx, hashed mask"), (dx_bits, "dx, packed mask")):
        assert ((got.double() - want_dx).abs() <= bound_dx).all(), what
    if p > 0:
        assert (mask == 0).any() and (mask > 1).any()  # the mask did drop and rescale
