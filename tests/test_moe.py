"""Mixture-of-experts models (transformers 5 keeps the experts as fused 3-D weights): MSPLoRA
adapts their linear layers and never leaves the experts out without saying so."""
import pytest
import torch

import msplora_kernels as mk
from models import tokens

transformers = pytest.importorskip("transformers")


def tiny_moe(family):
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                  num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=64, num_local_experts=4,
                                                                          **common)).eval()
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(moe_intermediate_size=48, num_experts=4,
                                                                        intermediate_size=64, **common)).eval()


FAMILIES = ["mixtral", "qwen3-moe"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "experts"], ["gate_up_proj"], r".*\.experts"])
def test_targets_that_reach_the_experts_are_refused_naming_them(family, targets):
    model = tiny_moe(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"reaches fused expert weights.*model\.layers\.0\.mlp\.experts\.\w+_proj "
                                         r"\(4, \d+, \d+\).*target_modules=\[.*'q_proj'.*\]"):
        mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=targets))
    # Refused before anything changed.
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_attention_of_a_moe_model_trains(family):
    model = mk.apply_msplora(tiny_moe(family), mk.MSPLoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                                init_lora_weights=False)).train()
    assert len(mk.adapted_layers(model)) == 12
    experts = [p for n, p in model.named_parameters() if "experts" in n]
    assert experts and not any(p.requires_grad for p in experts)
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in experts)
