"""layers_pattern: a model whose layers sit in a module list of another name ("resblocks")."""
import copy

import pytest
import torch
from torch import nn

import msplora_kernels as mk
from models import randomize_adapter


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.v, self.mlp = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.q(x) * self.v(x)) + self.mlp(x)


class ResBlocks(nn.Module):
    """OpenCLIP's shape: transformer.resblocks.<i>, then a head outside the stack."""

    def __init__(self, n=6, d=16):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.transformer.resblocks:
            x = block(x)
        return self.head(x)


def test_without_it_the_error_names_layers_pattern():
    with pytest.raises(ValueError, match=r"'transformer.resblocks.0.q' is not inside a stack of layers.*"
                                         r"\['layers', 'layer', 'h', 'blocks', 'block'\].*layers_pattern"):
        mk.apply_msplora(ResBlocks(), mk.MSPLoraConfig(target_modules=["q", "v"]))


def test_the_named_list_gives_each_layer_its_place_in_the_pyramid():
    model = mk.apply_msplora(ResBlocks(n=6), mk.MSPLoraConfig(target_modules=["q", "v"], layers_pattern="resblocks"))
    assert model.msplora_config.layers_pattern == ("resblocks",)
    paths = [p for p, _ in mk.adapted_layers(model)]
    assert paths == [f"transformer.resblocks.{i}.{n}" for i in range(6) for n in ("q", "v")]
    layers = dict(mk.adapted_layers(model))
    mids = [layers[f"transformer.resblocks.{i}.q"].levels[1] for i in range(6)]
    # Layer i of 6 is in group floor(3i / 6): layers 0-1, 2-3, 4-5 share their mid factors.
    assert [mids[i] is mids[j] for i, j in ((0, 1), (2, 3), (4, 5), (1, 2), (3, 4))] == [True] * 3 + [False] * 2
    assert all(layers[p].levels[0] is layers["transformer.resblocks.0.q"].levels[0] for p in paths if p.endswith(".q"))
    # The analysis finds each layer-specific level's layer through the same pattern.
    from msplora_kernels.analysis.spectra import pairs_from_model

    own = [pair for pair in pairs_from_model(model) if pair.group is None]
    assert sorted(pair.layer for pair in own) == sorted(list(range(6)) * 2)


def test_all_linear_stays_inside_the_named_stack_and_layers_to_transform_uses_it():
    model = mk.apply_msplora(ResBlocks(n=6), mk.MSPLoraConfig(target_modules="all-linear", layers_pattern=["resblocks"],
                                                               layers_to_transform=[1, 4]))
    paths = {p for p, _ in mk.adapted_layers(model)}
    assert paths == {f"transformer.resblocks.{i}.{n}" for i in (1, 4) for n in ("q", "v", "mlp")}
    assert type(model.head) is nn.Linear


def test_round_trip_and_a_different_pattern_loads_nothing(tmp_path):
    torch.manual_seed(0)
    base = ResBlocks()
    config = mk.MSPLoraConfig(target_modules=["q", "v"], layers_pattern="resblocks", dropout=0.1)
    model = mk.apply_msplora(copy.deepcopy(base), config)
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(copy.deepcopy(base), tmp_path).eval()
    assert loaded.msplora_config.layers_pattern == ("resblocks",)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
        assert not torch.equal(loaded(x), base(x))
    # The same model with a wrongly named list would file its layers under another stack.
    renamed = copy.deepcopy(base)
    renamed.transformer.blocks = renamed.transformer.resblocks
    del renamed.transformer.resblocks
    other = mk.apply_msplora(renamed, mk.MSPLoraConfig(target_modules=["q", "v"], dropout=0.1))
    before = {k: v.clone() for k, v in mk.adapter_state_dict(other).items()}
    with pytest.raises(mk.AdapterMismatchError, match=r"layers_pattern: file \['resblocks'\] vs model None"):
        mk.load_adapter(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in mk.adapter_state_dict(other).items())


@pytest.mark.parametrize("bad", ["transformer.resblocks", "", ["layers", 3], []])
def test_bad_patterns_are_named(bad):
    with pytest.raises(ValueError, match="layers_pattern must be the name"):
        mk.MSPLoraConfig(layers_pattern=bad)
