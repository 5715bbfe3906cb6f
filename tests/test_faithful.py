"""What the paper's code and PEFT do, done alike: the init, equal groups, modules_to_save restored."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import msplora_kernels as mk
from models import tiny_bert, tiny_llama, tokens


def _layer(init=True, in_f=512, out_f=384, ranks=(64, 32, 16)):
    return mk.MSPLoraLinear(in_f, out_f, ranks=ranks, init_lora_weights=init)


def test_default_init_is_the_papers_and_pefts():
    # PEFT: kaiming_uniform_(lora_A.weight, a=sqrt(5)) on the (rank, in) weight, lora_B zero: A is
    # uniform in +-1/sqrt(in_features), variance 1 / (3 in_features).
    # Over in_features, not the rank: with fan-in 64 the bound would be 2.8x wider.
    layer = _layer()
    bound = 1 / math.sqrt(512)
    for lvl in layer.levels:
        a = lvl.A.detach()
        assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
        assert abs(a.var().item() / (bound**2 / 3) - 1) < 0.1
        assert torch.count_nonzero(lvl.B) == 0


def test_default_init_draws_what_peft_draws():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(512, 384))
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=64, target_modules=["0"]))
    a_peft = lora.base_model.model[0].lora_A["default"].weight.detach()
    a_ours = _layer().levels[0].A.detach()
    # Same distribution: same bound, and variances within sampling error of each other.
    assert a_peft.abs().max() <= 1 / math.sqrt(512) and a_ours.abs().max() <= 1 / math.sqrt(512)
    assert abs(a_ours.var().item() / a_peft.var().item() - 1) < 0.1


def test_gaussian_and_random_b_inits():
    torch.manual_seed(3)
    gauss = _layer("gaussian")
    for lvl in gauss.levels:
        assert abs(lvl.A.detach().std().item() * lvl.rank - 1) < 0.1 and torch.count_nonzero(lvl.B) == 0
    random_b = _layer(False, in_f=64, out_f=48, ranks=(8, 4, 2))
    for lvl in random_b.levels:
        b = lvl.B.detach()
        assert b.abs().max() <= 1 / math.sqrt(lvl.rank) and torch.count_nonzero(b) == b.numel()
    x = torch.randn(5, 64)
    assert (random_b(x) - nn.functional.linear(x, random_b.weight, random_b.bias)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="init_lora_weights must be True"):
        _layer("kaiming")


def test_init_is_saved_with_the_adapter(tmp_path):
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj"], init_lora_weights="gaussian"))
    mk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"
    loaded = mk.load_msplora(tiny_llama(), tmp_path)
    assert loaded.msplora_config.init_lora_weights == "gaussian"
    for (_, a), (_, b) in zip(mk.adapter_state_dict(model).items(), mk.adapter_state_dict(loaded).items()):
        assert torch.equal(a, b)


def test_equal_group_counts_as_in_the_papers_default_config():
    # The paper's code's own default: four levels, ranks 8/6/4/2 with groups (1, 3, 3, N).
    model = tiny_llama(num_layers=6)
    config = mk.MSPLoraConfig(target_modules=["q_proj"], ranks=(8, 6, 4, 2), groups=(1, 3, 3, None))
    mk.apply_msplora(model, config)
    q = [layer for _, layer in mk.adapted_layers(model)]
    assert q[0].levels[1] is q[1].levels[1] and q[0].levels[2] is q[1].levels[2]
    assert q[0].levels[1] is not q[0].levels[2] and q[1].levels[2] is not q[2].levels[2]
    assert mk.summary(model)["total"] == (8 * 1 + 6 * 3 + 4 * 3 + 2 * 6) * (32 + 32)
    assert torch.isfinite(model(tokens()).logits).all()


def _trained_head_pair():
    """A tiny BERT classifier with MSPLoRA and one with PEFT LoRA, each with the same trained head."""
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    ours = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(modules_to_save=["classifier"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["query", "value"],
                                                                         modules_to_save=["classifier"]))
    trained = torch.randn_like(base.classifier.weight)
    with torch.no_grad():
        ours.classifier.weight.copy_(trained)
        theirs.base_model.model.classifier.modules_to_save["default"].weight.copy_(trained)
    return base, ours, theirs, trained


def test_disable_gives_the_base_models_outputs_exactly_as_peft_does():
    base, ours, theirs, _ = _trained_head_pair()
    ids = tokens()
    want = base(ids).logits
    assert (ours(ids).logits - want).abs().max() > 1e-2  # the trained head changes the outputs
    with mk.disable_adapters(ours):
        got = ours(ids).logits
    with theirs.disable_adapter():
        peft_got = theirs(ids).logits
    assert torch.equal(got, want) and torch.equal(peft_got, want)
    # On exit the trained head is back, and it is still what trains and what is saved.
    assert ours.classifier.weight.requires_grad and "classifier.weight" in mk.adapter_state_dict(ours)
    assert (ours(ids).logits - want).abs().max() > 1e-2


@pytest.mark.parametrize("call", ["unload", "merge_and_unload"])
def test_unload_gives_the_head_peft_gives(call):
    # As PEFT 0.22 (the pinned release) and later: merge_and_unload keeps the trained head,
    # unload gives back the original one. PEFT before 0.22 kept the trained head in unload too.
    peft = pytest.importorskip("peft")
    base, ours, theirs, trained = _trained_head_pair()
    want = trained if call == "merge_and_unload" else base.classifier.weight
    ours = getattr(mk, call)(ours)
    theirs = getattr(theirs, call)()
    assert torch.equal(ours.classifier.weight, want)
    if tuple(int(v) for v in peft.__version__.split(".")[:2]) >= (0, 22):
        assert torch.equal(theirs.classifier.weight, want)
    assert not hasattr(ours, "msplora_factors")
    assert {k for k in ours.state_dict()} == {k for k in base.state_dict()}
