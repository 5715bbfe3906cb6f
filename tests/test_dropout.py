"""Dropout: one mask on x shared by all levels, regenerated in backward, reproducible."""
import pytest
import torch

import msplora_kernels as mk
from helpers import backend_mask, check_backend_against_reference, drawn_seed, make_problem, precise_dtype
from msplora_kernels.ops import reference
from msplora_kernels.ops.backends import BACKENDS as BACKENDS_INFO

BACKENDS = mk.available_backends("cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_gradients_match_reference_with_same_mask(backend, p):
    problem = make_problem((3, 13), 24, 20, (8, 4, 2), precise_dtype(backend))
    check_backend_against_reference(backend, problem, dropout_p=p, training=True, rng_seed=77)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.6])
def test_keep_rate_and_scale(backend, p):
    x = torch.randn(64, 256)
    mask = backend_mask(backend, x, p, rng_seed=5)
    kept = mask != 0
    n = mask.numel()
    rate = kept.double().mean().item()
    # 5 standard deviations of a binomial keep rate.
    assert abs(rate - (1 - p)) < 5 * ((p * (1 - p)) / n) ** 0.5, rate
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_and_different_seed_differs(backend):
    x, w, b, As, Bs, scales = make_problem((8,), 32, 16, (4, 2), torch.float32)

    def out(seed):
        torch.manual_seed(seed)
        return mk.msplora_linear(x, w, b, As, Bs, scales, dropout_p=0.5, training=True, backend=backend)

    torch.testing.assert_close(out(3), out(3), rtol=0, atol=0)
    assert (out(3) - out(4)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_in_eval(backend):
    x, w, b, As, Bs, scales = make_problem((6,), 16, 8, (4,), precise_dtype(backend))
    y_eval = mk.msplora_linear(x, w, b, As, Bs, scales, dropout_p=0.5, training=False, backend=backend)
    y_ref = mk.msplora_linear_reference(x, w, b, As, Bs, scales)
    torch.testing.assert_close(y_eval, y_ref)


def test_mask_is_shared_by_all_levels():
    # With the mask shared, a layer of two identical levels equals one level of double scale.
    for backend in BACKENDS:
        x, w, b, As, Bs, scales = make_problem((10,), 16, 8, (4,), precise_dtype(backend))
        torch.manual_seed(9)
        two = mk.msplora_linear(x, w, b, As * 2, Bs * 2, scales * 2, dropout_p=0.5, training=True, backend=backend)
        torch.manual_seed(9)
        one = mk.msplora_linear(x, w, b, As, Bs, [2 * scales[0]], dropout_p=0.5, training=True, backend=backend)
        torch.testing.assert_close(two, one, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_across_row_chunks(backend):
    # More rows than the CPU kernels' 1024-row chunk: the mask index must carry across chunks.
    problem = make_problem((2100,), 8, 6, (3, 1), precise_dtype(backend))
    check_backend_against_reference(backend, problem, dropout_p=0.3, training=True, rng_seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_draws_the_reference_mask(backend):
    # One hash of (seed, row*K + col) on every backend (reference.py), so a run is reproducible
    # across backends and the reference is the oracle with dropout on; a K that is not a multiple
    # of any block, several seeds.
    x = torch.randn(70, 333)
    for rng_seed in (0, 1, 2):
        want = reference.dropout_mask(x, 0.25, drawn_seed(x, rng_seed))
        got = backend_mask(backend, x, 0.25, rng_seed)
        assert torch.equal(got, want), (backend, rng_seed)
        assert 0.7 < (got != 0).double().mean() < 0.8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_dropout_op_equals_the_reference_bit_for_bit(backend, dtype):
    if not BACKENDS_INFO[backend].supports(dtype):
        pytest.skip(f"{backend} does not compute in {dtype}")
    x = torch.randn(37, 45, dtype=dtype)
    seed = torch.tensor([987654], dtype=torch.int64)
    got = BACKENDS_INFO[backend].ops.dropout(x, 0.3, seed)
    assert got.is_contiguous() and got.data_ptr() != x.data_ptr()
    assert torch.equal(got, reference.dropout(x, 0.3, seed))


class _RecordingOps:
    """An op table that records which ops a training step called."""

    def __init__(self, ops):
        self.ops, self.called = ops, []

    def __getattr__(self, name):
        self.called.append(name)
        return getattr(self.ops, name)


# What the forward keeps for the backward -> the ops that draw or read the mask.
_CPU_MASK_PATHS = {
    (True, True): ({"dropout_keep_mask", "grad_x_bits"}, {"dropout", "grad_x", "shrink_keep_mask"}),
    (True, False): ({"dropout", "grad_x"}, {"dropout_keep_mask", "grad_x_bits", "shrink_keep_mask"}),
    (False, True): ({"shrink_keep_mask", "grad_x_bits", "grad_a_bits"}, {"dropout", "dropout_keep_mask", "grad_x"}),
    (False, False): ({"grad_x"}, {"dropout", "dropout_keep_mask", "grad_x_bits", "shrink_keep_mask", "grad_a_bits"}),
}


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_mask_paths_give_the_same_bits(monkeypatch, dtype):
    # On the CPU the forward keeps dropout(x) for dA and the packed mask for dx; every other
    # combination (down to hashing the mask again in the backward) must give the same result.
    import dataclasses

    from msplora_kernels.ops import backends

    data_seed = torch.seed()
    cpp = backends.BACKENDS["cpp"]
    assert (cpp.keeps_dropped_input, cpp.keeps_mask_bits) == (True, True)

    def outputs(keeps_input, keeps_bits):
        recording = _RecordingOps(cpp.ops)
        monkeypatch.setitem(backends.BACKENDS, "cpp", dataclasses.replace(
            cpp, keeps_dropped_input=keeps_input, keeps_mask_bits=keeps_bits))
        monkeypatch.setitem(backends._OP_TABLES, "cpp", recording)
        torch.manual_seed(data_seed)  # the same random problem and dropout seed each time
        x, w, b, As, Bs, scales = make_problem((40,), 70, 20, (8, 4, 2), dtype)
        y = mk.msplora_linear(x, w, b, As, Bs, scales, dropout_p=0.2, training=True, backend="cpp")
        y.backward(torch.randn_like(y))
        return [y.detach(), x.grad] + [t.grad for t in As + Bs], set(recording.called)

    want, _ = outputs(False, False)
    assert all(g.abs().sum() > 0 for g in want[1:])
    for (keeps_input, keeps_bits), (used, unused) in _CPU_MASK_PATHS.items():
        got, called = outputs(keeps_input, keeps_bits)
        assert used <= called and not unused & called, (keeps_input, keeps_bits, called)
        for g, w in zip(got, want):
            assert torch.equal(g, w), (keeps_input, keeps_bits)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled CPU kernels")
def test_cpp_refuses_a_packed_mask_of_the_wrong_shape_or_dtype():
    ops = torch.ops.msplora
    x, dt, dy, w, a = torch.randn(8, 70), torch.randn(8, 3), torch.randn(8, 5), torch.randn(5, 70), torch.randn(70, 3)
    with pytest.raises(RuntimeError, match=r"bits must have shape \(M, ceil\(K / 32\)\) = \(8, 3\), got \[8, 2\]"):
        ops.grad_a_bits(x, dt, torch.zeros(8, 2, dtype=torch.int32), 0.1)
    with pytest.raises(RuntimeError, match="bits must be a 2-D int32 packed mask, got Float"):
        ops.grad_x_bits(dy, w, dt, a, torch.zeros(8, 3), 0.1)
    with pytest.raises(RuntimeError, match=r"dropout p must be in \[0, 1\), got 1"):
        ops.grad_x_bits(dy, w, dt, a, torch.zeros(8, 3, dtype=torch.int32), 1.0)
