"""MSPLoRA on Hugging Face models: config, injection, counts, sharing, training, merge."""
import copy
import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaModel

import msplora_kernels as mk
from msplora_kernels.models.config import group_of
from models import randomize_adapter, tiny_bert, tiny_llama, tokens


def test_paper_counts_roberta_base_on_meta():
    with torch.device("meta"):
        model = RobertaModel(RobertaConfig())
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"], ranks=(8, 4, 2)))
    s = mk.summary(model)
    assert s["total"] == 135_168 and s["trainable"] == 135_168
    assert s["lora_equivalent"] == 294_912
    assert [row["factor_pairs"] for row in s["levels"]] == [2, 6, 24]


def test_paper_counts_llama2_7b_on_meta():
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=(64, 32, 16)))
    s = mk.summary(model)
    assert s["total"] == 11_010_048 and s["lora_equivalent"] == 33_554_432


@pytest.mark.parametrize("n,expected", [
    (12, [0] * 4 + [1] * 4 + [2] * 4),
    (32, [0] * 11 + [1] * 11 + [2] * 10),
    (7, [0, 0, 0, 1, 1, 2, 2]),
])
def test_group_assignment(n, expected):
    assert [group_of(i, n, 3) for i in range(n)] == expected
    assert [group_of(i, n, 1) for i in range(n)] == [0] * n
    assert [group_of(i, n, None) for i in range(n)] == list(range(n))


def test_model_layers_reference_their_group_factor():
    model = tiny_bert(num_layers=7)
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"]))
    factors = model.msplora_factors.targets
    for i, layer in enumerate(model.bert.encoder.layer):
        q = layer.attention.self.query
        assert q.levels[0] is factors["query"]["level0"]["group0"]
        assert q.levels[1] is factors["query"]["level1"][f"group{group_of(i, 7, 3)}"]
        assert q.levels[2] is q.own_levels["2"]
        v = layer.attention.self.value
        assert v.levels[0] is factors["value"]["level0"]["group0"] and v.levels[0] is not q.levels[0]


def test_shared_factors_are_one_storage_and_registered_once():
    model = tiny_bert()
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"]))
    layers = [layer.attention.self.query for layer in model.bert.encoder.layer]
    assert len({l.levels[0].A.data_ptr() for l in layers}) == 1
    names = [n for n, _ in model.named_parameters() if "level0" in n and "query" in n]
    assert names == ["msplora_factors.targets.query.level0.group0.A", "msplora_factors.targets.query.level0.group0.B"]
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert sum(1 for k in model.state_dict() if k.endswith("level0.group0.A")) == 2  # query and value


def test_shared_gradients_sum_over_layers():
    model = tiny_bert()
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"]))
    randomize_adapter(model)
    ids = tokens()
    model(ids).logits.square().sum().backward()
    shared = model.msplora_factors.targets["query"]["level0"]["group0"]
    tied = shared.A.grad.clone()
    # Untie: every layer gets its own copy of the global level; their gradients must add up to the tied one.
    untied = copy.deepcopy(model)
    untied.zero_grad()
    copies = []
    for layer in untied.bert.encoder.layer:
        q = layer.attention.self.query
        own = copy.deepcopy(q.levels[0])
        q._levels = (own,) + q._levels[1:]
        copies.append(own)
    untied(ids).logits.square().sum().backward()
    torch.testing.assert_close(sum(c.A.grad for c in copies), tied, rtol=1e-4, atol=1e-6)
    assert all(c.A.grad.abs().sum() > 0 for c in copies)


def test_only_adapter_parameters_change_when_training():
    model = tiny_bert()
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"], dropout=0.1))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = set(mk.adapter_state_dict(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    labels = torch.randint(0, 3, (3,))
    for _ in range(3):
        opt.zero_grad()
        model(tokens(), labels=labels).loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= adapter, sorted(changed - adapter)[:5]
    assert {k for k in adapter if k.endswith(".B")} <= changed


def test_modules_to_save_are_trained_and_counted():
    model = tiny_bert()
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert trainable == set(mk.adapter_state_dict(model))


def test_gqa_shapes_differ_per_target_name_and_mismatch_is_named():
    model = tiny_llama(kv_heads=2)
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj", "k_proj", "v_proj"]))
    k = model.model.layers[0].self_attn.k_proj
    assert (k.in_features, k.out_features) == (32, 16)
    # One regex naming two differently shaped layers under one target name cannot share.
    model2 = tiny_llama(kv_heads=2)
    for layer in model2.model.layers[:2]:
        layer.self_attn.q_proj = nn.Linear(32, 48, bias=False)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj \(32, 48\) and model.layers.2.self_attn.q_proj \(32, 32\)"):
        mk.apply_msplora(model2, mk.MSPLoraConfig(target_modules=["q_proj"]))


def test_bad_configs_are_clear():
    with pytest.raises(ValueError, match="groups has 2 entries but ranks has 3"):
        mk.MSPLoraConfig(groups=(1, 3))
    with pytest.raises(ValueError, match="every rank must be an int >= 1"):
        mk.MSPLoraConfig(ranks=(8, 0, 2))
    with pytest.raises(ValueError, match="groups must not decrease"):
        mk.MSPLoraConfig(groups=(3, 1, None))
    with pytest.raises(ValueError, match="lora_alpha has 2 entries"):
        mk.MSPLoraConfig(lora_alpha=(16, 8))
    with pytest.raises(ValueError, match="no nn.Linear or Conv1D matches"):
        mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not inside a stack of layers"):
        mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(target_modules=["classifier"]))
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())
    with pytest.raises(ValueError, match="already has an adapter named .default.*pick another adapter_name"):
        mk.apply_msplora(model, mk.MSPLoraConfig())


def test_four_level_pyramid_and_regex_targets():
    model = tiny_llama(num_layers=8)
    cfg = mk.MSPLoraConfig(target_modules=r".*\.(q_proj|v_proj)", ranks=(8, 6, 4, 2), groups=(1, 2, 4, None))
    mk.apply_msplora(model, cfg)
    s = mk.summary(model)
    assert [row["factor_pairs"] for row in s["levels"]] == [2, 4, 8, 16]


def test_merge_unmerge_disable_and_merge_and_unload():
    base = tiny_llama()
    ids = tokens()
    with torch.no_grad():
        base_out = base(ids).logits
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model, std=0.2)
    with torch.no_grad():
        adapted = model(ids).logits
        assert (adapted - base_out).abs().max() > 1e-3
        with mk.disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base_out)
        mk.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-5)
        with mk.disable_adapters(model):
            torch.testing.assert_close(model(ids).logits, base_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-5)
        mk.unmerge_adapter(model)
        merged = mk.merge_and_unload(model)
        assert not any(isinstance(m, mk.MSPLoraLinear) for m in merged.modules())
        assert not hasattr(merged, "msplora_factors")
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in merged.parameters())  # restored as before apply


def test_unload_restores_the_base_model():
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters()]
    model = mk.unload(mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig()))
    assert [n for n, _ in model.named_parameters()] == names
    ids = tokens()
    torch.testing.assert_close(model(ids).logits, base(ids).logits)


def test_layers_share_by_place_encoder_decoder_self_and_cross_attention_apart():
    # The paper's code shares a level between the layers at one place (the module path with the
    # layer index removed): T5's encoder and decoder stacks apart, and in the decoder the self-
    # and cross-attention q apart, though both are named q and have one shape.
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4, vocab_size=100)
    model = mk.apply_msplora(T5Model(cfg), mk.MSPLoraConfig(target_modules=["q", "v"]))
    targets = sorted(model.msplora_factors.targets.keys())
    assert targets == ["decoder_block__layer_0_SelfAttention_q", "decoder_block__layer_0_SelfAttention_v",
                       "decoder_block__layer_1_EncDecAttention_q", "decoder_block__layer_1_EncDecAttention_v",
                       "encoder_block__q", "encoder_block__v"]
    enc_q = model.encoder.block[0].layer[0].SelfAttention.q
    dec_q = model.decoder.block[0].layer[0].SelfAttention.q
    assert enc_q.levels[0] is not dec_q.levels[0]
    assert model.decoder.block[2].layer[0].SelfAttention.q.levels[0] is dec_q.levels[0]
    cross_q = model.decoder.block[2].layer[1].EncDecAttention.q
    assert cross_q.levels[0] is not dec_q.levels[0] and cross_q.levels[1] is not dec_q.levels[1]
    # The paper's count: per place, 1 global, 3 mid and N per-layer pairs of r (in + out) each.
    per_place = (8 * 1 + 4 * 3 + 2 * 3) * (32 + 32)
    assert mk.summary(model)["total"] == 6 * per_place == 9984
    ids = torch.randint(0, 100, (2, 7))
    out = model(input_ids=ids, decoder_input_ids=ids).last_hidden_state
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()


def test_an_adapter_saved_under_name_sharing_fails_to_load_and_says_why(tmp_path):
    # Before 0.2.0 the decoder's self- and cross-attention q shared one set of factors; such a file
    # has other tensors than the model and must load nothing, saying why.
    import json

    from transformers import T5Config, T5Model

    cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4, vocab_size=100)
    model = mk.apply_msplora(T5Model(cfg), mk.MSPLoraConfig(target_modules=["q", "v"]))
    mk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    old = {re.sub(r"decoder_block__layer_\d_(SelfAttention|EncDecAttention)_", "decoder_block__", k): v
           for k, v in tensors.items()}
    save_file(old, str(tmp_path / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "msplora_version": "0.1.0"}))
    fresh = T5Model(cfg)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(mk.AdapterMismatchError, match=r"saved by msplora-kernels 0.1.0, which shared a level .*"
                                                      r"T5's self- and cross-attention 'q'"):
        mk.load_msplora(fresh, tmp_path)
    assert not hasattr(fresh, "msplora_factors")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_all_linear_adapts_every_linear_in_the_layers_and_nothing_else():
    model = tiny_llama()
    in_layers = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.startswith("model.layers.")]
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules="all-linear"))
    assert [p for p, _ in mk.adapted_layers(model)] == in_layers
    assert type(model.lm_head) is nn.Linear
    assert sorted(model.msplora_factors.targets.keys()) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_all_linear_is_the_same_adapter_as_the_explicit_list():
    ids = tokens()
    outputs = []
    for targets in ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]:
        model = tiny_llama()
        torch.manual_seed(1)
        mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=targets))
        randomize_adapter(model, std=0.2)
        with torch.no_grad():
            outputs.append(model(ids).logits)
    assert (outputs[0] - tiny_llama()(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_one_name_in_places_of_different_shapes_gets_a_target_per_place(tmp_path):
    # BERT's 'dense' is attention.output.dense (32 -> 32), intermediate.dense (32 -> 64) and
    # output.dense (64 -> 32): they cannot share factors, so each place is its own target.
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(target_modules="all-linear"))
    assert sorted(model.msplora_factors.targets.keys()) == sorted(
        ["query", "key", "value", "attention_output_dense", "intermediate_dense", "output_dense"])
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    layer = model.bert.encoder.layer[3]
    assert layer.output.dense.levels[0] is model.bert.encoder.layer[0].output.dense.levels[0]
    assert layer.output.dense.levels[0] is not layer.attention.output.dense.levels[0]
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(tiny_bert(), tmp_path)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_safe_merge_refuses_a_non_finite_update_and_merges_nothing():
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    layers = dict(mk.adapted_layers(model))
    for layer in layers.values():
        torch.nn.init.normal_(layer.levels[2].B, std=0.1)
    before = {p: layer.weight.detach().clone() for p, layer in layers.items()}
    with torch.no_grad():
        layers["model.layers.3.self_attn.v_proj"].levels[2].B[0, 1] = float("nan")
    for merge in (mk.merge_adapter, mk.merge_and_unload):
        with pytest.raises(ValueError, match=r"NaN or inf into 1 layer\(s\): model.layers.3.self_attn.v_proj; nothing"):
            merge(model, safe_merge=True)
        assert not any(layer.merged for layer in layers.values())
        assert all(torch.equal(layer.weight, before[p]) for p, layer in layers.items())
    with pytest.raises(ValueError, match="nothing was merged"):
        layers["model.layers.3.self_attn.v_proj"].merge(safe_merge=True)
    # A finite adapter merges as without the check.
    with torch.no_grad():
        layers["model.layers.3.self_attn.v_proj"].levels[2].B[0, 1] = 0.5
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
        merged = mk.merge_and_unload(model, safe_merge=True)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_model_spread_over_devices_is_refused_naming_them():
    # device_map across GPUs places layers on several devices; the meta device stands in for a
    # second one here. Shared levels live on one device, so this is refused before any change.
    model = tiny_llama()
    model.model.layers[3:].to("meta")
    with pytest.raises(ValueError, match=r"several devices \(cpu: 6 layers, e\.g\. model\.layers\.0\.self_attn\.q_proj; "
                                         r"meta: 4 layers, e\.g\. model\.layers\.3\.self_attn\.q_proj\)"):
        mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in model.modules())
