"""rank_pattern: other ranks for some layers, as in PEFT, with shared levels kept consistent."""
import copy

import pytest
import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_llama, tokens

QV = ["q_proj", "v_proj"]


def _ranks_by_path(model):
    return {path: layer.ranks for path, layer in mk.adapted_layers(model)}


def test_a_target_gets_its_own_ranks_and_the_counts_follow():
    model = mk.apply_msplora(tiny_llama(num_layers=3), mk.MSPLoraConfig(target_modules=QV,
                                                                        rank_pattern={"v_proj": (6, 3, 1)}))
    ranks = _ranks_by_path(model)
    assert {r for p, r in ranks.items() if p.endswith("q_proj")} == {(8, 4, 2)}
    assert {r for p, r in ranks.items() if p.endswith("v_proj")} == {(6, 3, 1)}
    s = mk.summary(model)
    assert [row["rank"] for row in s["levels"]] == [[6, 8], [3, 4], [1, 2]]
    # q: 32 -> 32, v: 32 -> 16 (grouped-query attention); level 0 one pair per target, level 1 three
    # groups of one layer each, level 2 per layer.
    q, v = 32 + 32, 32 + 16
    assert s["total"] == (8 + 3 * 4 + 3 * 2) * q + (6 + 3 * 3 + 3 * 1) * v
    assert s["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert s["lora_equivalent"] == 3 * (8 * q + 6 * v)


def test_outputs_and_gradients_with_mixed_ranks():
    base = tiny_llama(num_layers=3)
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=QV, rank_pattern={"v_proj": (6, 3, 1)}))
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)  # a fresh adapter changes nothing
    randomize_adapter(model, std=0.2)
    model(ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = mk.merge_and_unload(copy.deepcopy(model))(ids).logits
    assert (adapted - base(ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_first_matching_key_wins_and_regex_keys_match_the_end_of_the_path():
    config = mk.MSPLoraConfig(target_modules=QV, rank_pattern={r"layers\.0\.self_attn\.q_proj": (8, 4, 5),
                                                                "q_proj": (8, 4, 3)})
    ranks = _ranks_by_path(mk.apply_msplora(tiny_llama(num_layers=3), config))
    assert ranks["model.layers.0.self_attn.q_proj"] == (8, 4, 5)  # only its own (per-layer) level differs
    assert ranks["model.layers.1.self_attn.q_proj"] == (8, 4, 3)
    assert ranks["model.layers.1.self_attn.v_proj"] == (8, 4, 2)
    assert config.ranks_for("model.layers.1.self_attn.xq_proj") == (8, 4, 2)  # a key matches whole names only


def test_a_pattern_that_splits_a_shared_level_is_refused():
    config = mk.MSPLoraConfig(target_modules=QV, rank_pattern={r"layers\.0\.self_attn\.q_proj": (16, 4, 2)})
    model = tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match=r"rank_pattern gives model.layers.0.self_attn.q_proj rank 16 and "
                                         r"model.layers.1.self_attn.q_proj rank 8 at level 0, which they share"):
        mk.apply_msplora(model, config)
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in model.modules())  # nothing was changed


def test_round_trip_and_a_different_pattern_loads_nothing(tmp_path):
    base = tiny_llama(num_layers=3)
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=QV, rank_pattern={"v_proj": [6, 3, 1]}))
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(copy.deepcopy(base), tmp_path).eval()
    assert loaded.msplora_config.rank_pattern == {"v_proj": (6, 3, 1)}
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    other = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=QV))
    before = {k: v.clone() for k, v in mk.adapter_state_dict(other).items()}
    with pytest.raises(mk.AdapterMismatchError, match=r"rank_pattern: file \{'v_proj': \[6, 3, 1\]\} vs model \{\}"):
        mk.load_adapter(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in mk.adapter_state_dict(other).items())


def test_export_to_peft_keeps_each_layers_rank(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(num_layers=3)
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=QV, rank_pattern={"v_proj": (6, 3, 1)}))
    randomize_adapter(model, std=0.2)
    assert mk.export_peft(model, tmp_path) == 14
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    v_proj = loaded.base_model.model.model.layers[1].self_attn.v_proj
    assert v_proj.r["default"] == 10 and v_proj.scaling["default"] == 1.0


def test_analysis_takes_each_pairs_own_rank():
    from msplora_kernels.analysis import analyze
    from msplora_kernels.analysis.spectra import pairs_from_model

    model = mk.apply_msplora(tiny_llama(num_layers=3), mk.MSPLoraConfig(target_modules=QV, rank_pattern={"v_proj": (6, 3, 1)}))
    randomize_adapter(model)
    pairs = pairs_from_model(model)
    layers = dict(mk.adapted_layers(model))
    v_global = next(p for p in pairs if p.level == 0 and p.target == "v_proj")
    assert v_global.a.shape[1] == 6 and v_global.scale == layers["model.layers.0.self_attn.v_proj"].scales[0] == 16 / 6
    result = analyze(pairs, model.msplora_config)
    assert result["levels"][0]["rank"] == [6, 8] and result["levels"][0]["mean_effective_rank_space"] == []
    assert 0 < result["levels"][0]["mean_entropy_effective_rank_over_rank"] <= 1


@pytest.mark.parametrize("bad,why", [
    ({"v_proj": 4}, r"rank_pattern\['v_proj'\] must be one int >= 1 per level, as ranks=\(8, 4, 2\) is, got 4"),
    ({"v_proj": (4, 2)}, r"must be one int >= 1 per level"),
    ({"v_proj": (4, 0, 1)}, r"must be one int >= 1 per level"),
    ({"v_proj(": (4, 2, 1)}, r"rank_pattern key 'v_proj\(' is not a valid regex"),
    ([("v_proj", (4, 2, 1))], r"rank_pattern must map module names or regexes to ranks"),
])
def test_bad_patterns_are_named(bad, why):
    with pytest.raises(ValueError, match=why):
        mk.MSPLoraConfig(rank_pattern=bad)
