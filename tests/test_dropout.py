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


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled CPU kernels")
def test_cpp_keeps_dropped_input_with_the_same_result(monkeypatch):
    # On the CPU the forward keeps dropout(x) for dA; regenerating it must give the same bits.
    from msplora_kernels.ops import autograd as fused

    taken = []
    keeps = fused._keeps_dropped_input
    monkeypatch.setattr(fused, "_keeps_dropped_input", lambda *a: taken.append(keeps(*a)) or taken[-1])
    data_seed = torch.seed()

    def outputs():
        torch.manual_seed(data_seed)  # the same random problem and dropout seed each time
        x, w, b, As, Bs, scales = make_problem((40,), 24, 20, (8, 4, 2), torch.float32)
        y = mk.msplora_linear(x, w, b, As, Bs, scales, dropout_p=0.2, training=True, backend="cpp")
        y.backward(torch.randn_like(y))
        return [y.detach(), x.grad] + [t.grad for t in As + Bs]

    kept = outputs()
    assert taken == [True]
    monkeypatch.setattr(fused, "_keeps_dropped_input", lambda *a: False)
    regenerated = outputs()
    for got, want in zip(kept, regenerated):
        assert torch.equal(got, want)
    assert all(g.abs().sum() > 0 for g in kept[1:])
