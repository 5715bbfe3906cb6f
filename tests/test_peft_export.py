"""export_peft writes a standard PEFT LoRA adapter whose outputs equal the MSPLoRA model's."""
import copy

import pytest
import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_bert, tiny_llama, tokens

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("make,targets,ranks,rslora", [
    (tiny_bert, ["query", "value"], (8, 4, 2), False),
    (tiny_llama, ["q_proj", "k_proj", "v_proj"], (7, 3, 1), False),
    (tiny_bert, "all-linear", (4, 2, 1), False),
    (tiny_bert, ["query", "value"], (8, 4, 2), True),  # the scales alpha / sqrt(r) are folded in too
], ids=["bert", "llama-gqa-odd-ranks", "bert-all-linear", "bert-rslora"])
def test_peft_model_reproduces_outputs(tmp_path, make, targets, ranks, rslora):
    base = make()
    config = mk.MSPLoraConfig(target_modules=targets, ranks=ranks, use_rslora=rslora)
    model = mk.apply_msplora(copy.deepcopy(base), config)
    randomize_adapter(model, std=0.2)
    rank = mk.export_peft(model, tmp_path)
    assert rank == sum(ranks)
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.r == rank and cfg.lora_alpha == rank
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        ours, theirs, plain = model(ids).logits, loaded(ids).logits, base(ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_modules_to_save_export(tmp_path):
    base = tiny_bert()
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(modules_to_save=["classifier"]))
    randomize_adapter(model)
    with torch.no_grad():
        model.classifier.weight.mul_(2.0)
    mk.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_merged_model_refuses_export(tmp_path):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())
    mk.merge_adapter(model)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        mk.export_peft(model, tmp_path)
