"""layers_to_transform: only some layers adapted, each keeping its place in the pyramid."""
import copy

import pytest
import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_llama, tokens


def test_only_the_named_layers_are_adapted_and_keep_their_groups():
    # 5 layers: with 3 groups, layers 3 and 4 are in groups floor(9/5) = 1 and floor(12/5) = 2.
    model = mk.apply_msplora(tiny_llama(num_layers=5), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"],
                                                                        layers_to_transform=[4, 3]))
    paths = [p for p, _ in mk.adapted_layers(model)]
    assert paths == [f"model.layers.{i}.self_attn.{n}" for i in (3, 4) for n in ("q_proj", "v_proj")]
    groups = model.msplora_factors.targets["q_proj"]
    assert sorted(groups["level1"].keys()) == ["group1", "group2"] and list(groups["level0"].keys()) == ["group0"]
    layer3, layer4 = (dict(mk.adapted_layers(model))[f"model.layers.{i}.self_attn.q_proj"] for i in (3, 4))
    assert layer3.levels[0] is layer4.levels[0] and layer3.levels[1] is not layer4.levels[1]
    # The same factor names as when every layer is adapted, so the subset is a slice of the full adapter.
    full = mk.apply_msplora(tiny_llama(num_layers=5), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    assert set(mk.adapter_state_dict(model)) < set(mk.adapter_state_dict(full))


def test_the_other_layers_are_untouched_and_the_adapter_round_trips(tmp_path):
    base = tiny_llama()
    config = mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], dropout=0.1)
    model = mk.apply_msplora(copy.deepcopy(base), config)
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(copy.deepcopy(base), tmp_path).eval()
    assert loaded.msplora_config.layers_to_transform == (0, 2)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    everywhere = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.1))
    with pytest.raises(mk.AdapterMismatchError, match=r"layers_to_transform: file \[0, 2\] vs model None"):
        mk.load_adapter(everywhere, tmp_path)


def test_bad_indices_are_named():
    with pytest.raises(ValueError, match=r"layers_to_transform must be layer indices >= 0, got \[1, -1\]"):
        mk.MSPLoraConfig(layers_to_transform=[1, -1])
    with pytest.raises(ValueError, match=r"layers_to_transform has \[7\], beyond every stack of layers \(model.layers has 5\)"):
        mk.apply_msplora(tiny_llama(num_layers=5), mk.MSPLoraConfig(target_modules=["q_proj"], layers_to_transform=[2, 7]))
    assert mk.MSPLoraConfig(layers_to_transform=3).layers_to_transform == (3,)  # one int, as PEFT takes
