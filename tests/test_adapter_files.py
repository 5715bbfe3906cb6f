"""Adapter files: exact round trips, every shared tensor once, loud failure that loads nothing."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import msplora_kernels as mk
from models import randomize_adapter, tiny_bert, tiny_llama, tokens


def _adapted(make, **cfg):
    base = make()
    model = mk.apply_msplora(copy.deepcopy(base), mk.MSPLoraConfig(**cfg))
    randomize_adapter(model)
    with torch.no_grad():
        for name, p in mk.adapter_state_dict(model).items():
            if name.endswith(".A"):
                p.add_(torch.randn_like(p) * 0.01)  # not the init values
    return base, model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in mk.adapter_state_dict(model).items()}


@pytest.mark.parametrize("make,targets", [(tiny_bert, ["query", "value"]), (tiny_llama, ["q_proj", "k_proj", "v_proj"])],
                         ids=["bert", "llama-gqa"])
def test_round_trip_is_exact(tmp_path, make, targets):
    base, model = _adapted(make, target_modules=targets)
    mk.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    # Exactly the trainable numbers, every shared tensor once.
    assert sum(t.numel() for t in saved.values()) == mk.summary(model)["trainable"]
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["adapter_type"] == "MSPLORA"
    fresh = mk.load_msplora(copy.deepcopy(base), tmp_path)
    for k, v in _snapshot(model).items():
        assert torch.equal(mk.adapter_state_dict(fresh)[k], v), k
    ids = tokens()
    out = lambda m: m(ids).logits  # noqa: E731
    torch.testing.assert_close(out(fresh), out(model), rtol=0, atol=0)


def test_modules_to_save_round_trip(tmp_path):
    base, model = _adapted(tiny_bert, target_modules=["query", "value"], modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    mk.save_adapter(model, tmp_path)
    fresh = mk.load_msplora(copy.deepcopy(base), tmp_path)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)


def _expect_nothing_loaded(model, directory, match):
    before = _snapshot(model)
    with pytest.raises(mk.AdapterMismatchError, match=match):
        mk.load_adapter(model, directory)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_different_config_fails_and_loads_nothing(tmp_path):
    _, model = _adapted(tiny_bert, target_modules=["query", "value"])
    mk.save_adapter(model, tmp_path)
    _, other = _adapted(tiny_bert, target_modules=["query", "value"], ranks=(8, 4, 1))
    _expect_nothing_loaded(other, tmp_path, r"ranks: file \[8, 4, 2\] vs model \[8, 4, 1\]")


def test_missing_and_unexpected_keys_name_the_layers(tmp_path):
    _, model = _adapted(tiny_bert, target_modules=["query", "value"])
    mk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    dropped = "bert.encoder.layer.3.attention.self.value.own_levels.2.B"
    tensors.pop(dropped)
    tensors["bert.encoder.layer.9.attention.self.value.own_levels.2.B"] = torch.zeros(2, 32)
    save_file(tensors, str(path))
    _, target = _adapted(tiny_bert, target_modules=["query", "value"])
    _expect_nothing_loaded(target, tmp_path, rf"missing from the file: {dropped}.*not in the model: bert.encoder.layer.9")


def test_wrong_shapes_fail_and_load_nothing(tmp_path):
    _, model = _adapted(lambda: tiny_bert(hidden=32), target_modules=["query", "value"])
    mk.save_adapter(model, tmp_path)
    _, wider = _adapted(lambda: tiny_bert(hidden=48), target_modules=["query", "value"])
    _expect_nothing_loaded(wider, tmp_path, r"shape mismatch: bert.encoder.layer.0.attention.self.query.own_levels.2.A "
                                            r"file \(32, 2\) vs model \(48, 2\).*nothing was loaded")


def test_truncated_and_corrupted_files(tmp_path):
    _, model = _adapted(tiny_bert, target_modules=["query", "value"])
    mk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_nothing_loaded(model, tmp_path, "corrupted or truncated")
    path.write_bytes(b"\x00" * 64)
    _expect_nothing_loaded(model, tmp_path, "corrupted or truncated")
    (tmp_path / "adapter_config.json").write_text("{not json")
    _expect_nothing_loaded(model, tmp_path, "not valid JSON")


def test_load_msplora_failure_leaves_model_untouched(tmp_path):
    _, model = _adapted(lambda: tiny_bert(hidden=32), target_modules=["query", "value"])
    mk.save_adapter(model, tmp_path)
    wider = tiny_bert(hidden=48)
    names = [n for n, _ in wider.named_parameters()]
    with pytest.raises(mk.AdapterMismatchError):
        mk.load_msplora(wider, tmp_path)
    assert [n for n, _ in wider.named_parameters()] == names
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in wider.modules())


def test_peft_lora_directory_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    _, model = _adapted(tiny_bert, target_modules=["query", "value"])
    mk.export_peft(model, tmp_path)
    with pytest.raises(ValueError, match="not 'MSPLORA'"):
        mk.load_msplora(tiny_bert(), tmp_path)
    assert peft  # the export itself is tested in test_peft_export.py


def test_save_pretrained_writes_the_adapter_alone_and_load_msplora_reads_it(tmp_path):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(modules_to_save=["classifier"]))
    randomize_adapter(model)
    model.save_pretrained(tmp_path)  # what the Trainer's checkpoints and model.push_to_hub write
    written = load_file(tmp_path / "adapter_model.safetensors")
    want = mk.adapter_state_dict(model)
    # PEFT's spelling of the names, and nothing of the frozen base.
    assert sorted(written) == sorted(f"base_model.model.{k}" for k in want)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = mk.adapter_state_dict(mk.load_msplora(tiny_bert(), tmp_path))
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_a_merged_model_saves_in_full_again(tmp_path):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())
    randomize_adapter(model)
    ids = tokens()
    want = model(ids).logits
    merged = mk.merge_and_unload(model)
    assert not merged._hf_peft_config_loaded and not hasattr(merged, "peft_config")
    merged.save_pretrained(tmp_path)
    from transformers import BertForSequenceClassification
    torch.testing.assert_close(BertForSequenceClassification.from_pretrained(tmp_path).eval()(ids).logits, want,
                               rtol=1e-5, atol=1e-6)


def test_a_whole_model_directory_gets_a_hint(tmp_path):
    mk.merge_and_unload(mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*whole model.*save_adapter"):
        mk.load_msplora(tiny_bert(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no adapter folder \S+missing, and it is not a Hub repo id"):
        mk.load_msplora(tiny_bert(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json in \S+empty$"):
        mk.load_msplora(tiny_bert(), tmp_path / "empty")
