"""MSPLoraLinear without autograd (no_grad, inference_mode, or nothing requiring a gradient): the
base output plus (x A) B with the levels joined once and kept while the factors are unchanged.
It must give the training path's outputs, and see every change of the factors at the next call."""
import pytest
import torch

import msplora_kernels as mk
from msplora_kernels.ops import autograd, functional

BACKENDS = [b for b in ("torch", "cpp") if b in mk.available_backends("cpu")]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _layer(backend="torch", dtype=torch.float32, dropout=0.1):
    layer = mk.MSPLoraLinear(48, 40, ranks=(8, 4, 2), dropout=dropout, backend=backend, dtype=dtype)
    with torch.no_grad():
        for lvl in layer.levels:
            lvl.B.normal_(std=0.2)
    return layer.eval()


def _with_function(layer, x):
    """The training path's output for x: the autograd Function, with grad mode on."""
    with torch.enable_grad():
        return functional.msplora_linear(x, layer.base_weight, layer.bias, [lvl.A for lvl in layer.levels],
                                         [lvl.B for lvl in layer.levels], list(layer.scales), backend=layer.backend,
                                         dropout_p=layer.dropout, training=False).detach()


@pytest.fixture
def no_function(monkeypatch):
    """Fails a test that reaches the autograd Function."""
    def refuse(*args, **kwargs):
        raise AssertionError("the autograd Function ran")

    monkeypatch.setattr(autograd.FusedMSPLoRAFunction, "apply", refuse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (3, 1, 48), (7, 48)])
def test_without_grad_it_gives_the_training_paths_outputs(backend, dtype, shape):
    layer = _layer(backend, dtype)
    x = torch.randn(*shape, dtype=dtype)
    want = _with_function(layer, x)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got = layer(x)
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_it_runs_no_autograd_function(no_function):
    layer = _layer()
    x = torch.randn(5, 48)
    with torch.no_grad():
        layer(x)
    frozen = _layer().requires_grad_(False)
    frozen(x)  # grad mode on, but nothing requires a gradient


def test_a_change_to_the_factors_is_seen_by_the_next_call():
    layer = _layer(dropout=0.0)
    x = torch.randn(4, 48)
    with torch.no_grad():
        before = layer(x)
        layer.levels[2].B.add_(0.5)  # in place: an optimizer step, a load_state_dict
        after = layer(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _with_function(layer, x))
    # New data under the same Parameter (as .to() and some loaders assign it) is seen.
    layer.levels[1].B.data = torch.randn_like(layer.levels[1].B)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _with_function(layer, x))
    # A new tensor in place of a factor (as a load that assigns) is seen too.
    layer.levels[0].A = torch.nn.Parameter(torch.randn(48, 8))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _with_function(layer, x))
    layer.double()
    with torch.no_grad():
        got = layer(x.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _with_function(layer, x.double()))


@pytest.mark.parametrize("optimizer", [dict(foreach=False), dict(fused=True)])
def test_an_optimizer_step_is_seen_even_where_it_keeps_the_version(optimizer):
    # A fused AdamW (the Trainer's pick) writes the factors without bumping their version counters.
    layer = _layer(dropout=0.0)
    x = torch.randn(4, 48)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, **optimizer)
    with torch.no_grad():
        before = layer(x)  # joined and kept, in eval mode, as between rollouts
    layer(x).sum().backward()
    opt.step()
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, _with_function(layer, x))


def test_a_shared_level_changed_through_one_layer_is_seen_by_the_others():
    model = mk.MSPLoraLinear(48, 40, ranks=(8, 4, 2))
    other = mk.MSPLoraLinear(48, 40, levels=[model.levels[0], None, None], ranks=(8, 4, 2))
    x = torch.randn(3, 48)
    with torch.no_grad():
        other(x)
        model.levels[0].B.normal_()
        torch.testing.assert_close(other(x), _with_function(other, x))


def test_merge_and_disable_are_seen():
    layer = _layer(dropout=0.0)
    x = torch.randn(2, 48)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        layer.disabled = True
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_training_with_dropout_keeps_the_mask_and_grad_mode_keeps_the_gradients():
    layer = _layer(dropout=0.5).train()
    x = torch.randn(64, 48)
    with torch.no_grad():
        torch.manual_seed(3)
        masked = layer(x)
    torch.manual_seed(3)
    with torch.enable_grad():
        want = functional.msplora_linear(x, layer.base_weight, layer.bias, [lvl.A for lvl in layer.levels],
                                         [lvl.B for lvl in layer.levels], list(layer.scales), dropout_p=0.5,
                                         training=True, backend=layer.backend)
    torch.testing.assert_close(masked, want.detach())
    layer.eval()
    y = layer(x)  # grad mode on, factors that require gradients: the Function
    y.sum().backward()
    assert all(lvl.A.grad is not None and lvl.B.grad is not None for lvl in layer.levels)


def test_bad_input_raises_the_usual_errors_without_grad():
    layer = _layer()
    with torch.no_grad(), pytest.raises(ValueError, match=r"x has last dimension 15 \(shape \(4, 15\)\)"):
        layer(torch.randn(4, 15))
    with torch.no_grad(), pytest.raises(mk.DtypeMismatchError, match="expected m1 and m2 to have the same dtype"):
        layer(torch.randn(4, 48, dtype=torch.float64))
    with torch.no_grad(), pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        layer([[0.0] * 48])
