"""The CUDA kernels (csrc/cuda/msplora_kernels.cu) run on the CPU, without a GPU.

g++ compiles the .cu (its launches rewritten into calls by tests/cuda_emulation.py) against the
test-only CUDA headers in tests/cuda_emulator/, which run each block's threads as fibers that
meet at barriers for __syncthreads and the warp shuffles. Each launch function's contract (kernels.h) is
checked against float64 on odd shapes, in every dtype, with and without dropout, and at several
split counts. Every buffer sits between guards: NaN around inputs, so that a read past the end
poisons the result, and a finite sentinel around outputs, so that a write or an atomic add past
the end changes it. The dropout mask must equal the cpp backend's, bit for bit.
"""
import ctypes
import subprocess

import pytest
import torch

from cuda_emulation import EMULATOR, INCLUDES, kernels_as_cpp, requirements
from msplora_kernels.ops import reference

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = list(DTYPE_CODE)
GUARD = 64
I64, F64, INT, PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {
    "emu_shrink": [INT, PTR, PTR, PTR, PTR, I64, I64, I64, F64, I64],
    "emu_grad_t_b": [INT, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, I64],
    "emu_masked_lora_dx": [INT, PTR, PTR, PTR, PTR, I64, I64, I64, F64],
    "emu_grad_a_dropout": [INT, PTR, PTR, PTR, PTR, I64, I64, I64, F64, I64],
    "emu_apply_dropout": [INT, PTR, PTR, PTR, I64, I64, F64],
}
pytestmark = requirements()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_emulator")
    lib = tmp / "emulated_kernels.so"
    cmd = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
           *[f"-I{p}" for p in INCLUDES], str(kernels_as_cpp(tmp)), str(EMULATOR / "bindings.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    handle = ctypes.CDLL(str(lib))
    for name, args in SIGNATURES.items():
        getattr(handle, name).argtypes = args
        getattr(handle, name).restype = INT
    return handle


# Finite, and changed by adding any non-zero value (NaN would absorb an atomic add).
OUTPUT_SENTINEL = 1234.5


class Guarded:
    """A matrix stored inside a 1-D buffer with `fill` on each side."""

    def __init__(self, values: torch.Tensor, fill: float = float("nan")):
        n = values.numel()
        self.buffer = torch.full((n + 2 * GUARD,), fill, dtype=values.dtype)
        self.fill = self.buffer[:GUARD].clone()
        self.value = self.buffer[GUARD:GUARD + n].view(values.shape)
        self.value.copy_(values)

    @property
    def ptr(self) -> int:
        return self.value.data_ptr()

    def assert_guards_intact(self, name: str):
        for side, part in (("before", self.buffer[:GUARD]), ("after", self.buffer[-GUARD:])):
            same = torch.equal(part, self.fill) or bool(torch.isnan(part).all() and torch.isnan(self.fill).all())
            assert same, f"{name}: the kernel wrote past its buffer ({side})"


def _rand(*shape, dtype):
    return Guarded(torch.randn(*shape).to(dtype))


def _zeros32(*shape):
    return Guarded(torch.zeros(*shape), fill=OUTPUT_SENTINEL)


def _seed(p):
    """The seed tensor, and the pointer the launcher passes: null without dropout, as msplora_cuda.cpp does."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return seed, (seed.data_ptr() if p > 0 else None)


def _keep(rows, cols, p, seed) -> torch.Tensor:
    """The cpp backend's dropout multiplier (0 or 1/(1-p)) in float64."""
    if p == 0:
        return torch.ones(rows, cols, dtype=torch.float64)
    kept = reference.dropout_mask(torch.empty(rows, cols), p, seed) != 0
    return kept.double() / (1 - p)


def _assert_fp32_sum(got: Guarded, want: torch.Tensor, name: str):
    got.assert_guards_intact(name)
    # fp32 accumulation of exactly representable inputs: only the sum's rounding differs.
    torch.testing.assert_close(got.value.double(), want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item()),
                               msg=lambda m: f"{name}: {m}")


def _assert_rounded(got: Guarded, want: torch.Tensor, dtype, name: str):
    got.assert_guards_intact(name)
    eps = torch.finfo(dtype).eps
    tol = max(eps, 1e-6)
    torch.testing.assert_close(got.value.double(), want, rtol=tol, atol=tol * want.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M,K,R", [(37, 70, 21), (3, 300, 112), (16, 32, 16)])
def test_shrink(emu, dtype, p, split_k, M, K, R):
    x, a, t32 = _rand(M, K, dtype=dtype), _rand(K, R, dtype=dtype), _zeros32(M, R)
    seed, seed_ptr = _seed(p)
    assert emu.emu_shrink(DTYPE_CODE[dtype], x.ptr, a.ptr, t32.ptr, seed_ptr, M, K, R, p, split_k) == 0
    want = (x.value.double() * _keep(M, K, p, seed)) @ a.value.double()
    _assert_fp32_sum(t32, want, "t32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_splits", [1, 3])
@pytest.mark.parametrize("M,N,R", [(37, 70, 21), (130, 200, 40)])
def test_grad_t_b(emu, dtype, n_splits, M, N, R):
    dy, t, b = _rand(M, N, dtype=dtype), _rand(M, R, dtype=dtype), _rand(R, N, dtype=dtype)
    dt32, db32 = _zeros32(M, R), _zeros32(R, N)
    assert emu.emu_grad_t_b(DTYPE_CODE[dtype], dy.ptr, t.ptr, b.ptr, dt32.ptr, db32.ptr, M, N, R, n_splits) == 0
    _assert_fp32_sum(dt32, dy.value.double() @ b.value.double().T, "dt32")
    _assert_fp32_sum(db32, t.value.double().T @ dy.value.double(), "db32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M,K,R", [(37, 70, 21), (20, 300, 40)])
def test_masked_lora_dx(emu, dtype, p, M, K, R):
    dt, a = _rand(M, R, dtype=dtype), _rand(K, R, dtype=dtype)
    dx = Guarded(torch.randn(M, K).to(dtype), fill=OUTPUT_SENTINEL)
    dx_before = dx.value.double().clone()
    seed, seed_ptr = _seed(p)
    assert emu.emu_masked_lora_dx(DTYPE_CODE[dtype], dt.ptr, a.ptr, dx.ptr, seed_ptr, M, K, R, p) == 0
    want = dx_before + _keep(M, K, p, seed) * (dt.value.double() @ a.value.double().T)
    _assert_rounded(dx, want, dtype, "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("m_splits", [1, 2])
@pytest.mark.parametrize("M,K,R", [(37, 70, 21), (300, 130, 40)])
def test_grad_a_dropout(emu, dtype, p, m_splits, M, K, R):
    x, dt, da32 = _rand(M, K, dtype=dtype), _rand(M, R, dtype=dtype), _zeros32(K, R)
    seed, seed_ptr = _seed(p)
    assert emu.emu_grad_a_dropout(DTYPE_CODE[dtype], x.ptr, dt.ptr, da32.ptr, seed_ptr, M, K, R, p, m_splits) == 0
    want = (x.value.double() * _keep(M, K, p, seed)).T @ dt.value.double()
    _assert_fp32_sum(da32, want, "da32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.3, 0.9])
@pytest.mark.parametrize("M,K", [(37, 70), (5, 1000)])
def test_dropout_mask_equals_cpp_bit_for_bit(emu, dtype, p, M, K):
    # The cuda backend's dropout_mask op: the dropout applied in place to a tensor of ones.
    out = Guarded(torch.ones(M, K, dtype=dtype), fill=OUTPUT_SENTINEL)
    seed, seed_ptr = _seed(p)
    assert emu.emu_apply_dropout(DTYPE_CODE[dtype], out.ptr, out.ptr, seed_ptr, M, K, p) == 0
    out.assert_guards_intact("mask")
    want = reference.dropout_mask(torch.empty(M, K, dtype=dtype), p, seed)
    assert torch.equal(out.value, want), f"{(out.value != want).sum().item()} of {M * K} mask elements differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("in_place", [False, True])
def test_apply_dropout(emu, dtype, p, in_place):
    M, K = 37, 70
    x = _rand(M, K, dtype=dtype)
    out = x if in_place else Guarded(torch.zeros(M, K, dtype=dtype), fill=OUTPUT_SENTINEL)
    seed, seed_ptr = _seed(p)
    # The kernel multiplies in fp32 by the fp32 keep scale and rounds once, as the cpp backend does.
    keep = _keep(M, K, p, seed) != 0
    want = (x.value.float() * keep * torch.tensor(1 / (1 - p), dtype=torch.float32)).to(dtype)
    assert emu.emu_apply_dropout(DTYPE_CODE[dtype], x.ptr, out.ptr, seed_ptr, M, K, p) == 0
    if not in_place:
        out.assert_guards_intact("out")
    assert torch.equal(out.value, want), f"{(out.value != want).sum().item()} of {M * K} elements differ"


def test_guards_catch_a_write_past_the_end(emu):
    # The check above can fail: tell the kernel there is one more row than the buffer holds.
    M, K, R = 8, 32, 16
    x, a, t32 = _rand(M + 1, K, dtype=torch.float32), _rand(K, R, dtype=torch.float32), _zeros32(M, R)
    assert emu.emu_shrink(0, x.ptr, a.ptr, t32.ptr, None, M + 1, K, R, 0.0, 1) == 0
    with pytest.raises(AssertionError, match="wrote past its buffer"):
        t32.assert_guards_intact("t32")
