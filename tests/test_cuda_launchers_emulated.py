"""The CUDA backend's launchers (csrc/cuda/msplora_cuda.cpp) on CPU tensors, against the cpp backend.

The launchers are compiled with the emulated kernels (tests/cuda_emulation.py) and stand-ins for
the three ATen/c10 CUDA headers they use (device properties, stream, device guard), and
registered as torch.ops.msplora_emulated_cuda. Their GEMMs then run on ATen's CPU GEMMs instead
of cuBLAS; the rest is the code a GPU runs: argument checks, contiguity, split counts (for an
H100's 132 SMs), fp32 accumulators and their casts, the p = 0 paths, empty inputs, and both ways
of computing the rank-R products (the cuda_skinny setting: our kernels, or cuBLAS plus a mask
kernel). Each op is compared with the cpp backend's, which the other tests hold to the reference.
"""
import pytest
import torch

from cuda_emulation import requirements

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = requirements()


@pytest.fixture
def cuda_ops(emulated_cuda_ops):
    return emulated_cuda_ops


@pytest.fixture
def cpp_ops():
    return torch.ops.msplora


@pytest.fixture(params=["auto", "kernels", "cublas"])
def skinny(request, cuda_ops):
    """Each way the launchers can compute the rank-R products (the cuda_skinny setting)."""
    cuda_ops.set_setting("cuda_skinny", request.param)
    yield request.param
    cuda_ops.set_setting("cuda_skinny", "auto")


def _rand(*shape, dtype, column_major=False):
    t = torch.randn(*reversed(shape)).t() if column_major else torch.randn(*shape)
    return t.to(dtype)


def _seed():
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


def _assert_close(got, want, name):
    got_kind, want_kind = (got.shape, got.dtype), (want.shape, want.dtype)
    assert got_kind == want_kind, f"{name}: {got_kind} vs {want_kind}"
    # Both round an fp32 sum of the same terms once; the order of the terms differs.
    tol = max(2 * torch.finfo(got.dtype).eps, 1e-5)
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * (1 + scale), msg=lambda m: f"{name}: {m}")


# (M, K, R): split-K of 2 at K = 600 (K / 256 bounds it), seven rank tiles at R = 112 (where
# "auto" takes cuBLAS), no rows.
SHRINK_SHAPES = [(37, 600, 21), (5, 64, 112), (0, 64, 14)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("M,K,R", SHRINK_SHAPES)
@pytest.mark.parametrize("column_major", [False, True])
def test_shrink(cuda_ops, cpp_ops, skinny, dtype, p, M, K, R, column_major):
    x, a, seed = _rand(M, K, dtype=dtype, column_major=column_major), _rand(K, R, dtype=dtype), _seed()
    _assert_close(cuda_ops.shrink(x, a, p, seed), cpp_ops.shrink(x, a, p, seed), "T")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,K,N,R", [(37, 70, 50, 21), (0, 16, 12, 14)])
def test_expand_linear(cuda_ops, cpp_ops, dtype, bias, M, K, N, R):
    x, weight = _rand(M, K, dtype=dtype), _rand(N, K, dtype=dtype)
    t, b = _rand(M, R, dtype=dtype), _rand(R, N, dtype=dtype)
    bias_t = _rand(N, dtype=dtype) if bias else None
    _assert_close(cuda_ops.expand_linear(x, weight, bias_t, t, b), cpp_ops.expand_linear(x, weight, bias_t, t, b), "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,R", [(300, 1100, 21), (37, 70, 112), (0, 64, 14)])  # 2 column splits at N = 1100
def test_grad_t_b(cuda_ops, cpp_ops, skinny, dtype, M, N, R):
    dy, t, b = _rand(M, N, dtype=dtype, column_major=True), _rand(M, R, dtype=dtype), _rand(R, N, dtype=dtype)
    (dt, db), (want_dt, want_db) = cuda_ops.grad_t_b(dy, t, b), cpp_ops.grad_t_b(dy, t, b)
    _assert_close(dt, want_dt, "dT")
    _assert_close(db, want_db, "dB")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("M,K,N,R", [(37, 70, 50, 21), (20, 300, 64, 112), (0, 16, 12, 14)])
def test_grad_x(cuda_ops, cpp_ops, skinny, dtype, p, M, K, N, R):
    dy, weight = _rand(M, N, dtype=dtype), _rand(N, K, dtype=dtype)
    dt, a, seed = _rand(M, R, dtype=dtype, column_major=True), _rand(K, R, dtype=dtype), _seed()
    _assert_close(cuda_ops.grad_x(dy, weight, dt, a, p, seed), cpp_ops.grad_x(dy, weight, dt, a, p, seed), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("M,K,R", [(600, 70, 21), (37, 300, 112), (0, 16, 14)])  # 2 row splits at M = 600
def test_grad_a(cuda_ops, cpp_ops, skinny, dtype, p, M, K, R):
    x, dt, seed = _rand(M, K, dtype=dtype), _rand(M, R, dtype=dtype, column_major=True), _seed()
    _assert_close(cuda_ops.grad_a(x, dt, p, seed), cpp_ops.grad_a(x, dt, p, seed), "dA")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.9])
def test_dropout_mask_equals_cpp_bit_for_bit(cuda_ops, cpp_ops, dtype, p):
    x, seed = _rand(37, 70, dtype=dtype), _seed()
    got, want = cuda_ops.dropout_mask(x, p, seed), cpp_ops.dropout_mask(x, p, seed)
    assert got.dtype == want.dtype and torch.equal(got, want), f"{(got != want).sum().item()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_dropout_equals_cpp_bit_for_bit(cuda_ops, cpp_ops, dtype, p):
    x, seed = _rand(37, 70, dtype=dtype, column_major=True), _seed()
    got, want = cuda_ops.dropout(x, p, seed), cpp_ops.dropout(x, p, seed)
    assert got.dtype == want.dtype and torch.equal(got, want), f"{(got != want).sum().item()} elements differ"
    assert got.data_ptr() != x.data_ptr() and got.is_contiguous()


def test_unknown_skinny_mode_raises(cuda_ops):
    with pytest.raises(RuntimeError, match="cuda_skinny: auto, kernels or cublas"):
        cuda_ops.set_setting("cuda_skinny", "tensorcores")
    assert cuda_ops.get_setting("cuda_skinny") == "auto"


def test_the_setting_is_followed(cuda_ops):
    # With dropout in fp16, our kernels scale x by 1 / (1 - p) in fp32 inside the product, while the
    # cuBLAS path (ATen's CPU GEMM here) multiplies a masked copy of x rounded to fp16: other bits.
    x, a, seed = _rand(64, 512, dtype=torch.float16), _rand(512, 21, dtype=torch.float16), _seed()
    results = {}
    for mode in ("kernels", "cublas"):
        cuda_ops.set_setting("cuda_skinny", mode)
        results[mode] = cuda_ops.shrink(x, a, 0.25, seed)
    cuda_ops.set_setting("cuda_skinny", "auto")  # our kernels at R = 21
    assert torch.equal(cuda_ops.shrink(x, a, 0.25, seed), results["kernels"])
    assert not torch.equal(results["kernels"], results["cublas"])
    assert torch.equal(results["cublas"], torch.mm(cuda_ops.dropout(x, 0.25, seed), a))


def test_argument_checks_raise(cuda_ops):
    x, a = torch.randn(4, 16), torch.randn(15, 3)
    with pytest.raises(RuntimeError, match="mismatch"):
        cuda_ops.shrink(x, a, 0.0, _seed())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("ranks", [(8, 4, 2), (64, 32, 16)], ids=["R14", "R112"])
def test_the_whole_layer_on_the_launchers_matches_the_reference(emulated_cuda_backend, skinny, dtype, p, ranks):
    # Forward and backward through the autograd Function with the cuda backend's capabilities, on
    # the launchers' ops, against the reference drawing the same mask from the same seed.
    from helpers import check_backend_against_reference, make_problem

    problem = make_problem((3, 41), 96, 80, ranks, dtype)
    check_backend_against_reference(emulated_cuda_backend, problem, dropout_p=p, training=p > 0, rng_seed=13)
