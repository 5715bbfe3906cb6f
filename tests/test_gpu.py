"""GPU tests at real sizes: every CUDA backend against the reference (skipped without CUDA).

Tolerances follow flash-attention: a kernel may be at most twice as far from the float64
truth as the reference computed in the same low precision (tests/helpers.py).
"""
import pytest
import torch

import msplora_kernels as mk
from helpers import backend_mask, check_backend_against_reference, make_problem
from msplora_kernels.ops import settings as mk_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CUDA_BACKENDS = [b for b in ("triton", "cuda", "torch") if torch.cuda.is_available() and b in mk.available_backends("cuda")]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (tokens, in_features, out_features, ranks): RoBERTa-base and LLaMA2-7B q/v, and odd sizes.
SHAPES = [
    (8192, 768, 768, (8, 4, 2)),
    (8192, 4096, 4096, (64, 32, 16)),
    (1000, 4096, 1024, (64, 32, 16)),
    (777, 1000, 333, (7, 5, 3, 1)),
]


def test_gpu_backends_present():
    assert "triton" in CUDA_BACKENDS, mk.backend_info()["backends"]["triton"]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-r{'-'.join(map(str, s[3]))}")
def test_matches_reference_real_sizes(backend, dtype, shape):
    tokens, k, n, ranks = shape
    problem = make_problem((tokens,), k, n, ranks, dtype, device="cuda")
    check_backend_against_reference(backend, problem)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_float32_with_tf32_allowed(backend):
    # With TF32 the Triton kernels take the tf32 dot; before fp32 had tiles of its own, no
    # configuration of the rank-112 pyramid fit sm_90's shared memory (bench/NOTES.md).
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        problem = make_problem((4096,), 4096, 4096, (64, 32, 16), torch.float32, device="cuda")
        check_backend_against_reference(backend, problem)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_leading_dims_noncontiguous_and_levels(backend, dtype):
    for ranks in [(16,), (16, 8), (64, 32, 16), (9, 7, 5, 3)]:
        problem = make_problem((4, 300), 512, 384, ranks, dtype, device="cuda", noncontig=True)
        check_backend_against_reference(backend, problem)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_weight_stored_in_out(backend, dtype):
    # A Conv1D base (GPT-2) hands the kernels the transposed view of its (in, out) weight.
    problem = make_problem((2, 700), 768, 2304, (8, 4, 2), dtype, device="cuda", weight_in_out=True)
    assert not problem[1].is_contiguous()
    check_backend_against_reference(backend, problem, dropout_p=0.1, training=True)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_empty_batch(backend):
    x, w, b, As, Bs, s = make_problem((0,), 256, 128, (8, 4, 2), torch.bfloat16, device="cuda")
    y = mk.msplora_linear(x, w, b, As, Bs, s, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 128) and x.grad.shape == x.shape and torch.all(As[0].grad == 0)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dropout_matches_reference_with_same_mask(backend, dtype):
    problem = make_problem((2048,), 768, 768, (8, 4, 2), dtype, device="cuda")
    check_backend_against_reference(backend, problem, dropout_p=0.1, training=True, rng_seed=21)
    mask = backend_mask(backend, problem[0], 0.1, rng_seed=21)
    rate = (mask != 0).double().mean().item()
    assert abs(rate - 0.9) < 5 * (0.09 / mask.numel()) ** 0.5


@pytest.mark.parametrize("backend", [b for b in CUDA_BACKENDS if b != "torch"])
def test_base_weight_trained(backend):
    problem = make_problem((512,), 256, 320, (8, 4, 2), torch.float32, device="cuda", train_base=True)
    check_backend_against_reference(backend, problem)


def _op_cases(ns):
    x, a = torch.randn(300, 256, device="cuda"), torch.randn(256, 14, device="cuda")
    seed = torch.tensor([5], dtype=torch.int64, device="cuda")
    w, b, bias = torch.randn(192, 256, device="cuda"), torch.randn(14, 192, device="cuda"), torch.randn(192, device="cuda")
    dy = torch.randn(300, 192, device="cuda")
    t = ns.shrink(x, a, 0.0, seed)
    dt, _ = ns.grad_t_b(dy, t, b)
    return [
        (ns.shrink, (x, a, 0.3, seed)),
        (ns.expand_linear, (x, w, bias, t, b)),
        (ns.grad_t_b, (dy, t, b)),
        (ns.grad_x, (dy, w, dt, a, 0.3, seed)),
        (ns.grad_a, (x, dt, 0.3, seed)),
        (ns.dropout_mask, (x, 0.3, seed)),
        *([(ns.dropout, (x, 0.3, seed))] if hasattr(ns, "dropout") else []),  # the compiled ops only
    ]


@pytest.mark.parametrize("backend", [b for b in CUDA_BACKENDS if b != "torch"])
def test_opcheck(backend):
    ns = torch.ops.msplora_triton if backend == "triton" else torch.ops.msplora
    for op, args in _op_cases(ns):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_follows_nn_linear(backend, dtype):
    layer = mk.MSPLoraLinear(768, 768, ranks=(8, 4, 2), backend=backend, device="cuda")
    for lvl in layer.levels:
        torch.nn.init.normal_(lvl.B, std=0.05)
    x = torch.randn(4, 256, 768, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
        ref = mk.msplora_linear_reference(x, layer.weight, layer.bias, [l.A for l in layer.levels],
                                          [l.B for l in layer.levels], list(layer.scales))
        lin = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == lin.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().square().mean().backward()
    assert layer.levels[0].A.grad.dtype == torch.float32 and torch.isfinite(layer.levels[0].A.grad).all()


@pytest.mark.skipif("triton" not in CUDA_BACKENDS, reason="needs the triton backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_triton_one_pass_forward_real_sizes(dtype, dropout):
    # The opt-in single-kernel forward (the triton_forward setting) at the RoBERTa-base shape
    # and an odd one, and its op under opcheck's fake-tensor and AOT checks.
    for shape in [(8192, 768, 768, (8, 4, 2)), (777, 1000, 333, (7, 5, 3, 1))]:
        tokens, k, n, ranks = shape
        problem = make_problem((tokens,), k, n, ranks, dtype, device="cuda")
        with mk_settings.overridden(triton_forward="onepass"):
            check_backend_against_reference("triton", problem, dropout_p=dropout, training=dropout > 0, rng_seed=5)
    x, w, bias = (torch.randn(300, 256, device="cuda"), torch.randn(192, 256, device="cuda"),
                  torch.randn(192, device="cuda"))
    a, b = torch.randn(256, 14, device="cuda"), torch.randn(14, 192, device="cuda")
    seed = torch.tensor([5], dtype=torch.int64, device="cuda")
    torch.library.opcheck(torch.ops.msplora_triton.shrink_expand_linear, (x, w, bias, a, b, 0.3, seed))


@pytest.mark.skipif(not {"triton", "cuda"} <= set(CUDA_BACKENDS), reason="needs the triton and cuda backends")
def test_triton_cuda_and_cpu_draw_the_same_mask():
    # One hash (reference.py) in all: compiled Triton must agree with the CUDA kernel, the
    # reference on the GPU, and the CPU one, bit for bit, for the same seed.
    from msplora_kernels.ops import reference
    from msplora_kernels.ops.backends import BACKENDS

    x = torch.randn(3000, 777, device="cuda")
    for seed in (0, 12345, 2**31 - 2):
        s = torch.tensor([seed], dtype=torch.int64, device="cuda")
        triton_mask = BACKENDS["triton"].ops.dropout_mask(x, 0.1, s)
        cuda_mask = BACKENDS["cuda"].ops.dropout_mask(x, 0.1, s)
        assert torch.equal(triton_mask, cuda_mask), seed
        assert torch.equal(cuda_mask, reference.dropout_mask(x, 0.1, s)), seed
        if "cpp" in mk.available_backends("cpu"):
            cpu_mask = BACKENDS["cpp"].ops.dropout_mask(x.cpu(), 0.1, s.cpu())
            assert torch.equal(cuda_mask.cpu(), cpu_mask), seed


@pytest.mark.skipif("cuda" not in CUDA_BACKENDS, reason="needs the cuda backend")
@pytest.mark.parametrize("skinny", ["kernels", "cublas"])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (64, 32, 16)], ids=["R14", "R112"])
def test_cuda_backend_both_ways_of_the_rank_products(skinny, ranks):
    # The default takes one way per rank (R > 64: cuBLAS); each must be right at either rank.
    problem = make_problem((1000,), 1024, 768, ranks, torch.bfloat16, device="cuda")
    with mk_settings.overridden(cuda_skinny=skinny):
        assert torch.ops.msplora.get_setting("cuda_skinny") == skinny
        check_backend_against_reference("cuda", problem, dropout_p=0.1, training=True)
