"""use_rslora: each level scaled by alpha / sqrt(rank), as PEFT's option of that name."""
import copy
import json
import math

import pytest
import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_bert, tiny_llama, tokens

RANKS = (8, 4, 2)


def _adapted(use_rslora=True, **kwargs):
    base = tiny_bert()
    config = mk.MSPLoraConfig(ranks=RANKS, lora_alpha=(16, 12, 6), use_rslora=use_rslora, **kwargs)
    return base, mk.apply_msplora(copy.deepcopy(base), config)


def test_every_level_is_scaled_by_alpha_over_sqrt_rank():
    _, model = _adapted()
    want = (16 / math.sqrt(8), 12 / math.sqrt(4), 6 / math.sqrt(2))
    assert model.msplora_config.scales == pytest.approx(want, rel=1e-12)
    for _, layer in mk.adapted_layers(model):
        assert layer.scales == pytest.approx(want, rel=1e-12)
    _, plain = _adapted(use_rslora=False)
    assert plain.msplora_config.scales == pytest.approx((16 / 8, 12 / 4, 6 / 2), rel=1e-12)


def test_layer_output_matches_float64_with_rslora_scales():
    _, model = _adapted()
    randomize_adapter(model, std=0.3)
    path, layer = mk.adapted_layers(model)[3]
    x = torch.randn(6, layer.in_features)
    want = x.double() @ layer.weight.double().T + layer.bias.double()
    for lvl in layer.levels:
        want += lvl.alpha / math.sqrt(lvl.rank) * (x.double() @ lvl.A.double()) @ lvl.B.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight().double().T,
                                   sum(lvl.alpha / math.sqrt(lvl.rank) * lvl.A.double() @ lvl.B.double()
                                       for lvl in layer.levels), rtol=1e-5, atol=1e-6)


def test_one_level_equals_peft_rslora():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, use_rslora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    ours = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=(8,),
                                                                  groups=(None,), use_rslora=True))
    layers = dict(mk.adapted_layers(ours))
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                level = layers[name.removeprefix("base_model.model.")].levels[0]
                level.A.copy_(module.lora_A["default"].weight.T)
                level.B.copy_(module.lora_B["default"].weight.T)
        ids = tokens()
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)


def test_save_load_keeps_rslora_and_a_mismatch_loads_nothing(tmp_path):
    _, model = _adapted(dropout=0.1)
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    loaded = mk.load_msplora(tiny_bert(), tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    _, other = _adapted(use_rslora=False, dropout=0.1)
    before = {k: v.clone() for k, v in mk.adapter_state_dict(other).items()}
    with pytest.raises(mk.AdapterMismatchError, match="use_rslora: file True vs model False"):
        mk.load_adapter(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in mk.adapter_state_dict(other).items())


def test_a_config_saved_before_the_option_reads_as_false(tmp_path):
    config = mk.MSPLoraConfig()
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    del data["use_rslora"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    assert mk.MSPLoraConfig.from_pretrained(tmp_path).use_rslora is False


def test_a_non_bool_is_refused():
    with pytest.raises(ValueError, match="use_rslora must be true or false, got 'yes'"):
        mk.MSPLoraConfig(use_rslora="yes")


def test_lora_spectra_read_a_peft_rslora_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from msplora_kernels.analysis.spectra import lora_layer_spectra

    cfg = peft.LoraConfig(target_modules=["query"], r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False)
    lora = peft.get_peft_model(tiny_bert(), cfg)
    lora.save_pretrained(str(tmp_path))
    spectra = lora_layer_spectra(tmp_path)["query"]
    module = lora.base_model.model.bert.encoder.layer[2].attention.self.query
    delta = 16 / math.sqrt(4) * (module.lora_B["default"].weight @ module.lora_A["default"].weight).double()
    torch.testing.assert_close(spectra[2].double(), torch.linalg.svdvals(delta)[:4], rtol=1e-4, atol=1e-6)
