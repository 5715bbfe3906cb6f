"""GPT-2's transformers Conv1D layers (weight stored (in, out)) as MSPLoRA targets."""
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import msplora_kernels as mk
from transformers import GPT2LMHeadModel

from models import randomize_adapter, tiny_gpt2, tokens


def _adapted(targets="all-linear", **kwargs):
    base = tiny_gpt2()
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=targets, **kwargs))
    return base, model


def test_conv1d_layers_are_adapted_sharing_the_weight():
    base = tiny_gpt2()
    conv = base.transformer.h[1].attn.c_attn
    model = mk.apply_msplora(base, mk.MSPLoraConfig(target_modules="all-linear"))
    layers = dict(mk.adapted_layers(model))
    assert len(layers) == 4 * 3 and all(layer.fan_in_fan_out for layer in layers.values())
    c_attn = layers["transformer.h.1.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    # The Conv1D's own (in, out) Parameter, not a copy; the kernels get its transposed view.
    assert c_attn.weight is conv.weight and c_attn.bias is conv.bias
    assert c_attn.base_weight.shape == (96, 32)
    # attn.c_proj (32 -> 32) and mlp.c_proj (128 -> 32) share a name, not a shape: one target each.
    assert sorted(model.msplora_factors.targets.keys()) == ["attn_c_proj", "c_attn", "c_fc", "mlp_c_proj"]
    assert type(model.lm_head) is nn.Linear


def test_fresh_adapter_keeps_outputs_and_a_trained_one_changes_them():
    base, model = _adapted(targets=["c_attn", "c_fc"])
    ids = tokens()
    with torch.no_grad():
        plain = base(ids).logits
        torch.testing.assert_close(model(ids).logits, plain, rtol=1e-5, atol=1e-5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = copy.deepcopy(model.state_dict())
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed and changed <= set(mk.adapter_state_dict(model))
    with torch.no_grad():
        assert (model(ids).logits - plain).abs().max() > 1e-4


def test_merge_and_unload_give_conv1d_back():
    base, model = _adapted()
    randomize_adapter(model, std=0.2)
    ids = tokens()
    with torch.no_grad():
        adapted = model(ids).logits
        merged = mk.merge_and_unload(copy.deepcopy(model))
        assert type(merged.transformer.h[0].attn.c_attn) is Conv1D
        assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
        unloaded = mk.unload(model)
        for name, value in base.state_dict().items():
            assert torch.equal(unloaded.state_dict()[name], value), name
        assert all(p.requires_grad for p in unloaded.parameters())


def test_state_dict_keeps_the_base_keys_and_layout():
    # The whole adapted model's state dict (what a full checkpoint holds) must not hand a plain
    # GPT-2 transposed weights: attn.c_proj is square, so a transposed one would load silently.
    base, model = _adapted()
    randomize_adapter(model, std=0.2)
    state = model.state_dict()
    for name, value in base.state_dict().items():
        assert torch.equal(state[name], value), name
    plain = GPT2LMHeadModel(base.config).eval()
    result = plain.load_state_dict(state, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == set(mk.adapter_state_dict(model))
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, base(ids).logits, rtol=0, atol=0)
        # And the adapted model takes a plain state_dict back, its factors untouched.
        factors = {k: v.clone() for k, v in mk.adapter_state_dict(model).items()}
        adapted = model(ids).logits
        model.load_state_dict(base.state_dict(), strict=False)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=0)
        assert all(torch.equal(v, factors[k]) for k, v in mk.adapter_state_dict(model).items())


def test_merge_unmerge_restore_the_conv1d_weight():
    base, model = _adapted()
    randomize_adapter(model, std=0.2)
    layer = dict(mk.adapted_layers(model))["transformer.h.0.mlp.c_fc"]
    before = layer.weight.detach().clone()
    x = torch.randn(5, 32)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        assert layer.weight.shape == (32, 128)
        torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)
        ref = x.double() @ before.double() + layer.bias.double() + x.double() @ layer.delta_weight().double()
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, before, rtol=0, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    _, model = _adapted(dropout=0.1)
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(tiny_gpt2(), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_peft_export_loads_on_gpt2_with_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    base, model = _adapted()
    randomize_adapter(model, std=0.2)
    mk.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        ours = model(ids).logits
        assert (ours - base(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-4, atol=1e-5)


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="expected nn.Linear or transformers Conv1D, got Conv1d"):
        mk.MSPLoraLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_compiled_model_matches_eager():
    # Under torch.compile the ops get the Conv1D weight's transposed view too, and with dropout
    # forward and backward must share one mask (fallback_random: inductor draws the seed as eager).
    _, model = _adapted(dropout=0.1)
    randomize_adapter(model, std=0.2)
    model.train()
    ids = tokens()

    def loss_and_grads(fn):
        model.zero_grad()
        torch.manual_seed(3)
        loss = fn(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    loss, grads = loss_and_grads(model)
    with torch._inductor.config.patch(fallback_random=True):
        loss_c, grads_c = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads.keys() and len(grads) == sum(p.requires_grad for p in model.parameters())
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
