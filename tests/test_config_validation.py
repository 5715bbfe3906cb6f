"""Every field of MSPLoraConfig is checked, from arguments and from adapter_config.json alike, and
a bad file is refused before the model is touched."""
import json

import pytest
import torch

import msplora_kernels as mk
from models import tiny_llama

# field -> values of the wrong type or out of range, each refused with a ValueError naming the field.
BAD = {
    "target_modules": [[], "(", 5, [""], {"q_proj": 1}],
    "ranks": [8, [], [0], [8, True], "842", [8.0]],
    "lora_alpha": [True, 0, -16, float("nan"), "16", [16, 16], None],
    "use_rslora": [1, "true", None],
    "init_lora_weights": [1, "kaiming", None],
    "dropout": [True, 1.0, -0.1, "0.1", None],
    "groups": [[3, 1, None], [1, None, 3], [1, 3], "13", [1, 0, None]],
    "backend": ["x", "CPP", 3],
    "modules_to_save": ["classifier", [1], [""], 5],
    "layers_to_transform": [[-1], ["0"], [], True, "0"],
    "layers_pattern": ["model.layers", [""], 5],
    "rank_pattern": [[("q_proj", [8, 4, 2])], {"q_proj": 8}, {"q_proj": [8, 4]}, {"(": [8, 4, 2]}],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, vs in BAD.items() for v in vs],
                         ids=[f"{f}={v!r}" for f, vs in BAD.items() for v in vs])
def test_a_bad_field_is_refused_from_arguments(field, value):
    with pytest.raises(ValueError, match=field):
        mk.MSPLoraConfig(**{"target_modules": ["q_proj"], field: value})


@pytest.mark.parametrize("field,value", [(f, vs[0]) for f, vs in BAD.items()], ids=list(BAD))
def test_a_bad_field_in_a_file_loads_nothing(tmp_path, field, value):
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj"]))
    mk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        mk.load_msplora(fresh, tmp_path)
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in fresh.modules())
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_good_values_are_kept_in_their_canonical_form():
    config = mk.MSPLoraConfig(target_modules=["q_proj"], ranks=[8, 4, 2], lora_alpha=[16, 8, 4], dropout=0,
                              groups=[1, 3, None], modules_to_save=None, layers_to_transform=2)
    assert config.ranks == (8, 4, 2) and config.lora_alpha == (16.0, 8.0, 4.0) and config.dropout == 0.0
    assert config.modules_to_save == () and config.layers_to_transform == (2,) and config.backend is None
    assert mk.MSPLoraConfig.from_dict(config.to_dict()) == config
