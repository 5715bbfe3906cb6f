"""MSPLoRA on quantized frozen bases (bitsandbytes 4-bit nf4/fp4 and 8-bit), QLoRA-style, on the CPU:
tiny LLaMAs loaded by transformers with BitsAndBytesConfig from a checkpoint written in the test."""
import copy
import warnings

import pytest
import torch
from torch import nn

import msplora_kernels as mk
from helpers import drawn_seed
from models import tokens
from models import tiny_llama
from quantized_models import HIDDEN, KINDS, from_pretrained_quantized, write_checkpoint
from msplora_kernels.models.base_layers import hold_trainable_layout

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

CONFIG = dict(target_modules=["q_proj", "v_proj"], ranks=(8, 4, 2), lora_alpha=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def load_quantized(checkpoint, kind):
    model = from_pretrained_quantized(checkpoint, kind)
    # In the layout apply_msplora keeps 4-bit weights in (base_layers.hold_trainable_layout), so that
    # the base model and the adapted one compute the base alike.
    for module in model.modules():
        hold_trainable_layout(module)
    return model.eval().requires_grad_(False)


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


def test_a_fresh_adapter_gives_the_quantized_models_outputs(checkpoint, kind):
    base = load_quantized(checkpoint, kind)
    ids = tokens()
    want = base(ids).logits
    model = mk.apply_msplora(base, mk.MSPLoraConfig(**CONFIG))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, mk.MSPLoraLinear) and layer.base_layer is not None
    assert not layer.base_layer.weight.is_floating_point()  # still quantized, no float copy kept
    assert not any(p.is_floating_point() and p.shape == (64, 64) for p in layer.parameters(recurse=False))
    assert torch.equal(model(ids).logits, want)
    per_pair = 8 * 1 + 4 * 3 + 2 * 5  # rank-weighted pairs per place: 1 global, 3 mid, 5 layers
    assert mk.summary(model)["total"] == per_pair * (64 + 64) + per_pair * (64 + 32)


def test_training_lowers_the_loss_and_trains_every_b(checkpoint, kind):
    model = mk.apply_msplora(load_quantized(checkpoint, kind), mk.MSPLoraConfig(**CONFIG, dropout=0.05)).train()
    before = {k: v.detach().clone() for k, v in mk.adapter_state_dict(model).items()}
    quantized_before = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids, losses = tokens(batch=4, length=12), []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = mk.adapter_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.endswith(".B"))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, quantized_before)  # frozen


def _trained(checkpoint, kind, seed=0):
    model = mk.apply_msplora(load_quantized(checkpoint, kind), mk.MSPLoraConfig(**CONFIG))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in mk.adapter_state_dict(model).items():
            if name.endswith(".B"):
                p.normal_(std=0.05)
    return model


def test_save_and_load_exactly(checkpoint, kind, tmp_path):
    model = _trained(checkpoint, kind)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(load_quantized(checkpoint, kind), tmp_path)
    ids = tokens()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_peft_lora_on_the_same_quantized_base_loads_the_export(checkpoint, kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained(checkpoint, kind)
    mk.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_quantized(checkpoint, kind), tmp_path).eval()
    ids = tokens()
    torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_disable_unload_and_merge(checkpoint, kind):
    model = _trained(checkpoint, kind)
    base = load_quantized(checkpoint, kind)
    ids = tokens()
    adapted = model(ids).logits
    with mk.disable_adapters(model):
        assert torch.equal(model(ids).logits, base(ids).logits)
    assert torch.equal(model(ids).logits, adapted)
    with pytest.warns(UserWarning, match="re-quantizes its weight, which adds rounding"):
        merged = mk.merge_and_unload(copy.deepcopy(model))
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is type(base.model.layers[0].self_attn.q_proj) and not q_proj.weight.is_floating_point()
    # Within the rounding the requantized weight adds: far closer to the adapted outputs than to the base's.
    err = (merged(ids).logits - adapted).abs().max()
    assert err < 0.25 * (adapted - base(ids).logits).abs().max(), err
    unloaded = mk.unload(model)
    assert torch.equal(unloaded(ids).logits, base(ids).logits)


@pytest.mark.parametrize("backend", mk.available_backends("cpu"))
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradients_match_a_reference_that_dequantizes(checkpoint, kind, backend, dropout):
    from msplora_kernels.models.base_layers import dequantized_weight

    torch.manual_seed(1)
    quantized = load_quantized(checkpoint, kind).model.layers[1].self_attn.q_proj
    layer = mk.MSPLoraLinear.from_linear(quantized, ranks=(8, 4, 2), dropout=dropout, backend=backend).train()
    for lvl in layer.levels:
        nn.init.normal_(lvl.B, std=0.2)
    x = torch.randn(3, 11, HIDDEN, requires_grad=True)
    dy = torch.randn(3, 11, HIDDEN)
    torch.manual_seed(5)
    y = layer(x)
    grads = torch.autograd.grad(y, [x] + [p for lvl in layer.levels for p in (lvl.A, lvl.B)], dy)
    # The reference: the dequantized weight in float64, the same dropout seed.
    w = dequantized_weight(quantized).double()
    bias = None if quantized.bias is None else quantized.bias.double()
    xr = x.detach().double().requires_grad_(True)
    factors = [p.detach().double().requires_grad_(True) for lvl in layer.levels for p in (lvl.A, lvl.B)]
    y_ref = mk.msplora_linear_reference(xr, w, bias, factors[0::2], factors[1::2], list(layer.scales), dropout,
                                        drawn_seed(x, 5) if dropout else None)
    want = torch.autograd.grad(y_ref, [xr] + factors, dy.double())
    # What the quantized forward alone allows: bitsandbytes against the dequantized weight.
    base_err = (quantized(x.detach()).double() - xr.detach() @ w.T - (0 if bias is None else bias)).abs().max().item()
    tol = 2 * base_err + 1e-4
    assert (y.double() - y_ref).abs().max() <= tol * (1 + y_ref.abs().max())
    for name, g, h in zip(["x"] + [f"{n}{i}" for i in range(3) for n in "AB"], grads, want):
        assert (g.double() - h).abs().max() <= tol * (1 + h.abs().max()), name


def test_the_analysis_runs_on_an_adapter_trained_on_a_quantized_base(checkpoint, tmp_path):
    from msplora_kernels.analysis import analyze, pairs_from_dir

    mk.save_adapter(_trained(checkpoint, "nf4-double"), tmp_path)
    pairs, config = pairs_from_dir(tmp_path)
    metrics = analyze(pairs, config)
    assert [row["rank"] for row in metrics["levels"]] == [8, 4, 2]


class OtherLibraryLinear(nn.Linear):
    """A stand-in for another library's quantized layer: an nn.Linear with an integer weight."""

    def __init__(self):
        super().__init__(HIDDEN, HIDDEN)
        self.weight = nn.Parameter(torch.zeros(HIDDEN, HIDDEN, dtype=torch.int8), requires_grad=False)


def test_another_librarys_quantized_layer_is_refused_and_nothing_changes():
    model = tiny_llama(hidden=HIDDEN)
    model.model.layers[1].self_attn.q_proj = OtherLibraryLinear()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"model.layers.1.self_attn.q_proj \(test_quantized.OtherLibraryLinear\) has a "
                                        r"torch.int8 weight .*takes floating-point base layers and bitsandbytes"):
        mk.apply_msplora(model, mk.MSPLoraConfig(**CONFIG))
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_training_after_an_evaluation_pass_gets_the_same_gradients(checkpoint):
    # On CPUs with AVX512-BF16, bitsandbytes converts 4-bit weights to an inference-only layout in an
    # eval pass without gradients (as a Trainer's evaluation runs); after that, gradients to the
    # input of every such layer are silently dropped. apply_msplora keeps every 4-bit layer in the
    # layout that trains, and unload restores bitsandbytes' own switch.
    def fresh():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = transformers.AutoModelForCausalLM.from_pretrained(
                checkpoint, quantization_config=transformers.BitsAndBytesConfig(**KINDS["nf4-double"]),
                device_map="cpu")
        switch = getattr(base.model.layers[0].self_attn.o_proj, "support_avx512bf16_for_cpu", None)
        torch.manual_seed(0)  # the same A and B in both models
        model = mk.apply_msplora(base, mk.MSPLoraConfig(**CONFIG))
        with torch.no_grad():
            for name, p in mk.adapter_state_dict(model).items():
                p.normal_(std=0.05) if name.endswith(".B") else None
        return model, switch

    ids = tokens()

    def grads(model):
        model.train()(ids, labels=ids).loss.backward()
        return {k: p.grad for k, p in mk.adapter_state_dict(model).items()}

    evaluated, switch = fresh()
    with torch.no_grad():
        evaluated.eval()(ids)
    want, got = grads(fresh()[0]), grads(evaluated)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert want["model.layers.0.self_attn.q_proj.own_levels.2.B"].abs().sum() > 0
    mk.unload(evaluated)
    assert getattr(evaluated.model.layers[0].self_attn.o_proj, "support_avx512bf16_for_cpu", None) == switch
