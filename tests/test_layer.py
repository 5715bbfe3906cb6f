"""MSPLoraLinear: drop-in behaviour, shared levels, merge/unmerge, dtype rules."""
import pytest
import torch
from torch import nn

import msplora_kernels as mk
from msplora_kernels import LoraLevel, MSPLoraLinear

BACKENDS = [b for b in mk.available_backends("cpu")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_layer_equals_its_linear(backend):
    lin = nn.Linear(24, 18)
    layer = MSPLoraLinear.from_linear(lin, ranks=(8, 4, 2), backend=backend)
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-6)
    standalone = MSPLoraLinear(24, 18, bias=False, ranks=(3,), backend=backend)
    torch.testing.assert_close(standalone(x), x @ standalone.weight.T, rtol=0, atol=1e-6)


def test_from_linear_reuses_weight_and_freezes_base():
    lin = nn.Linear(10, 6)
    layer = MSPLoraLinear.from_linear(lin)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {f"own_levels.{i}.{f}" for i in range(3) for f in "AB"}
    assert layer.ranks == (8, 4, 2) and layer.scales == (2.0, 4.0, 8.0)
    assert all(torch.all(lvl.B == 0) for lvl in layer.levels)
    assert all(lvl.A.abs().sum() > 0 for lvl in layer.levels)


def test_per_level_alpha_and_repr():
    layer = MSPLoraLinear(8, 8, ranks=(4, 2), lora_alpha=(8, 4), dropout=0.1)
    assert layer.scales == (2.0, 2.0)
    text = repr(layer)
    assert "ranks=(4, 2)" in text and "alpha=(8, 4)" in text and "dropout=0.1" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_level_gradients_sum_over_layers(backend):
    shared = LoraLevel(16, 16, rank=4)
    nn.init.normal_(shared.B)
    l1 = MSPLoraLinear(16, 16, ranks=(4, 2), levels=[shared, None], backend=backend)
    l2 = MSPLoraLinear(16, 16, ranks=(4, 2), levels=[shared, None], backend=backend)
    assert l1.levels[0].A is l2.levels[0].A
    # Not registered by the layers: the owner registers it once.
    assert all(p is not shared.A for p in l1.parameters())
    x1, x2 = torch.randn(6, 16), torch.randn(6, 16)
    (l1(x1).square().sum() + l2(x2).square().sum()).backward()
    got_a, got_b = shared.A.grad.clone(), shared.B.grad.clone()
    ga, gb = [], []
    for layer, x in ((l1, x1), (l2, x2)):
        shared.A.grad = shared.B.grad = None
        layer(x).square().sum().backward()
        ga.append(shared.A.grad.clone())
        gb.append(shared.B.grad.clone())
    torch.testing.assert_close(got_a, ga[0] + ga[1])
    torch.testing.assert_close(got_b, gb[0] + gb[1])
    assert ga[0].abs().sum() > 0 and ga[1].abs().sum() > 0


def test_shared_level_shape_mismatch_is_named():
    shared = LoraLevel(16, 8, rank=4)
    with pytest.raises(ValueError, match=r"levels\[0\] is for \(16 -> 8\) but this layer is \(16 -> 16\)"):
        MSPLoraLinear(16, 16, ranks=(4,), levels=[shared])


def _trained_layer(dtype=torch.float32):
    layer = MSPLoraLinear(32, 24, ranks=(8, 4, 2), dtype=dtype)
    for lvl in layer.levels:
        nn.init.normal_(lvl.B, std=0.3)
    return layer


def test_delta_weight_matches_dense_update():
    layer = _trained_layer(torch.float64)
    # Level by level, as the paper writes it; delta_weight() goes through the reference's joined form.
    ref = sum(s * (l.A @ l.B) for l, s in zip(layer.levels, layer.scales)).T
    torch.testing.assert_close(layer.delta_weight(), ref.detach())
    x = torch.randn(9, 32, dtype=torch.float64)
    dense = nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias)
    torch.testing.assert_close(layer(x), dense)


def test_merge_unmerge_outputs_and_no_drift():
    layer = _trained_layer()
    x = torch.randn(10, 32)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    after_one = (layer.weight - w0).abs().max().item()
    merged_mag = (w0 + layer.delta_weight()).abs().max().item()
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    drift = (layer.weight - w0).abs().max().item()
    # One round trip may round once (an ulp of the merged weight); more trips must not walk away.
    ulp = torch.finfo(torch.float32).eps * merged_mag
    assert after_one <= 2 * ulp and drift <= after_one + ulp, (after_one, drift, ulp)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_dtype_mismatch_like_nn_linear():
    layer = MSPLoraLinear(8, 4)
    x64 = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError) as linear_err:
        nn.Linear(8, 4)(x64)
    with pytest.raises(RuntimeError, match="same dtype") as ours:
        layer(x64)
    assert isinstance(ours.value, TypeError) and "x is torch.float64, weight is torch.float32" in str(ours.value)
    assert "same dtype" in str(linear_err.value)


# CPU autocast means bf16, which Triton's interpreter miscomputes in tl.dot; bf16 Triton runs on a GPU.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_autocast_cpu_bf16_follows_nn_linear(backend):
    lin = nn.Linear(16, 12)
    layer = MSPLoraLinear.from_linear(lin, ranks=(4, 2), backend=backend)
    for lvl in layer.levels:
        nn.init.normal_(lvl.B)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_lin = lin(x)
        # The reference's plain ops, under the same autocast.
        ref = mk.msplora_linear_reference(x, layer.weight, layer.bias, [l.A for l in layer.levels],
                                          [l.B for l in layer.levels], list(layer.scales))
    assert y.dtype == y_lin.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert layer.levels[0].A.grad.dtype == torch.float32


def test_fp32_adapter_on_bf16_base():
    layer = MSPLoraLinear(16, 8, ranks=(4,), dtype=torch.bfloat16)
    lvl = LoraLevel(16, 8, 4)  # fp32 factors
    nn.init.normal_(lvl.B)
    layer2 = MSPLoraLinear(16, 8, ranks=(4,), levels=[lvl], dtype=torch.bfloat16,
                           _weight=layer.weight, _bias=layer.bias)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer2(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lvl.A.grad.dtype == torch.float32 and lvl.A.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode_then_training(backend):
    # Evaluation under torch.inference_mode() first, as pipelines do, then a training step: nothing
    # made or cached under inference mode may end up saved for backward.
    torch.manual_seed(3)
    layer = MSPLoraLinear(20, 12, ranks=(5, 3, 1), lora_alpha=12, dropout=0.1, backend=backend)
    for lvl in layer.levels:
        nn.init.normal_(lvl.B, std=0.3)
    x = torch.randn(6, 20)
    want = mk.msplora_linear_reference(x, layer.weight, layer.bias, [lvl.A for lvl in layer.levels],
                                       [lvl.B for lvl in layer.levels], list(layer.scales))
    with torch.inference_mode():
        got = layer.eval()(x)
    torch.testing.assert_close(got, want)
    layer.train()
    layer(x.clone().requires_grad_(True)).square().sum().backward()
    assert all(lvl.A.grad is not None and lvl.A.grad.abs().sum() > 0 for lvl in layer.levels)
