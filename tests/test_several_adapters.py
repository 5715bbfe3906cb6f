"""Several adapters on one model: names, switching, combining, deleting, files, and a DPO
reference that is an adapter. Tiny LLaMAs built in code; every check against a model that holds
the adapter alone, or against float64."""
import gc
import weakref

import pytest
import torch

import msplora_kernels as mk
from models import CountingSequences, tiny_llama, tokens

QV = dict(target_modules=["q_proj", "v_proj"])


def _randomized(model, adapter, seed):
    """Give every B factor of one adapter random values (a trained-looking adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in mk.adapter_state_dict(model, adapter).items():
            if key.endswith(".B"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def three_adapters():
    """A model with adapters "default" (q/v, 8/4/2), "b" (q/v, 4/2/2) and "c" (all-linear, 2/2/2)."""
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(**QV))
    mk.apply_msplora(model, mk.MSPLoraConfig(**QV, ranks=(4, 2, 2)), adapter_name="b")
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules="all-linear", ranks=(2, 2, 2)), adapter_name="c")
    for seed, name in enumerate(["default", "b", "c"]):
        _randomized(model, name, seed)
    return model.eval()


def alone(model, name, tmp_path):
    """The adapter saved from `model` and loaded into a fresh base by itself."""
    mk.save_adapter(model, tmp_path / name, adapter_name=name)
    return mk.load_msplora(tiny_llama(), tmp_path / name).eval()


def test_a_new_adapter_is_added_inactive_and_set_adapter_switches(tmp_path):
    model = three_adapters()
    assert mk.adapter_names(model) == ["default", "b", "c"] and mk.active_adapters(model) == ["default"]
    ids = tokens()
    for name in ["b", "c", "default"]:
        mk.set_adapter(model, name)
        assert mk.active_adapters(model) == [name]
        torch.testing.assert_close(model(ids).logits, alone(model, name, tmp_path)(ids).logits, rtol=1e-5, atol=1e-5)
    # Only the active adapter trains.
    mk.set_adapter(model, "b")
    model.train()
    model(ids, labels=ids).loss.backward()
    for name in ["default", "b", "c"]:
        tensors = mk.adapter_state_dict(model, name).values()
        assert all(t.requires_grad == (name == "b") for t in tensors)
        assert all((t.grad is not None) == (name == "b") for t in tensors)


def test_active_together_their_updates_add(tmp_path):
    model = three_adapters()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    want = torch.nn.functional.linear(x, layer.weight.double())
    for name in ["b", "c"]:
        for lvl in layer.adapter_levels[name]:
            want = want + lvl.scale * (x @ lvl.A.double()) @ lvl.B.double()
    mk.set_adapter(model, ["b", "c"])
    assert mk.active_adapters(model) == ["b", "c"]
    torch.testing.assert_close(layer(x.float()).double(), want, rtol=1e-5, atol=1e-5)
    with mk.using_adapter(model, "default"):
        assert mk.active_adapters(model) == ["default"]
    assert mk.active_adapters(model) == ["b", "c"]


def test_the_path_without_autograd_follows_a_switch():
    model = three_adapters()
    ids = tokens()
    with torch.no_grad():
        first = model(ids).logits
        mk.set_adapter(model, "b")
        second = model(ids).logits
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, model(ids).logits.detach(), rtol=1e-5, atol=1e-5)


def test_one_adapter_saved_from_three_loads_alone_with_the_same_outputs(tmp_path):
    model = three_adapters()
    mk.save_adapter(model, tmp_path / "all")
    # PEFT's layout: "default" in the folder, the others in sub-folders of their names.
    assert (tmp_path / "all" / "adapter_config.json").is_file()
    assert all((tmp_path / "all" / n / "adapter_model.safetensors").is_file() for n in ["b", "c"])
    ids = tokens()
    for name in ["default", "b", "c"]:
        folder = tmp_path / "all" / ("" if name == "default" else name)
        fresh = mk.load_msplora(tiny_llama(), folder).eval()
        mk.set_adapter(model, name)
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        want = mk.adapter_state_dict(model, name)
        got = mk.adapter_state_dict(fresh)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # And loaded back as named adapters beside each other.
    again = mk.load_msplora(tiny_llama(), tmp_path / "all")
    mk.load_msplora(again, tmp_path / "all" / "c", adapter_name="c")
    assert mk.adapter_names(again) == ["default", "c"] and mk.active_adapters(again) == ["default"]
    mk.set_adapter(again, "c")
    mk.set_adapter(model, "c")
    torch.testing.assert_close(again.eval()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_delete_adapter_frees_its_factors_and_plain_layers_come_back():
    model = three_adapters()
    mk.set_adapter(model, "b")
    c_factor = weakref.ref(model.model.layers[0].mlp.gate_proj.adapter_levels["c"][2].A)
    c_shared = weakref.ref(model.msplora_factors.adapters["adapter_c"].targets["gate_proj"]["level0"]["group0"].A)
    mk.delete_adapter(model, "c")
    gc.collect()
    assert c_factor() is None and c_shared() is None
    assert mk.adapter_names(model) == ["default", "b"]
    # gate_proj had "c" alone: a plain nn.Linear again; q_proj keeps its other adapters.
    assert type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    assert set(model.model.layers[0].self_attn.q_proj.adapter_levels) == {"default", "b"}
    assert not any(".c_" in k or "adapters.adapter_c." in k for k in model.state_dict())


def test_bad_requests_are_clear_and_change_nothing(tmp_path):
    model = three_adapters()
    with pytest.raises(ValueError, match="no adapter named 'x'.*'default', 'b', 'c'"):
        mk.set_adapter(model, "x")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        mk.apply_msplora(model, mk.MSPLoraConfig(**QV), adapter_name="b")
    with pytest.raises(ValueError, match="adapter_name must be a name"):
        mk.apply_msplora(model, mk.MSPLoraConfig(**QV), adapter_name="a.b")
    with pytest.raises(ValueError, match="'default' is the active adapter; set_adapter"):
        mk.delete_adapter(model, "default")
    mk.apply_msplora(model, mk.MSPLoraConfig(**QV, dropout=0.1), adapter_name="d")
    with pytest.raises(ValueError, match="differ in dropout"):
        mk.set_adapter(model, ["default", "d"])
    mk.delete_adapter(model, "d")
    with pytest.raises(ValueError, match="modules_to_save with several adapters"):
        mk.apply_msplora(model, mk.MSPLoraConfig(**QV, modules_to_save=["lm_head"]), adapter_name="e")
    with pytest.raises(ValueError, match="differ in .*target_modules"):
        mk.add_weighted_adapter(model, ["default", "c"], [1.0, 1.0], "mix")
    # Loading a name that exists fails before anything changes; a file that does not fit loads nothing.
    mk.save_adapter(model, tmp_path / "b", adapter_name="b")
    names = mk.adapter_names(model)
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        mk.load_msplora(model, tmp_path / "b", adapter_name="b")
    mk.save_adapter(mk.apply_msplora(tiny_llama(num_layers=3), mk.MSPLoraConfig(**QV, ranks=(4, 2, 2))),
                    tmp_path / "other")
    with pytest.raises(mk.AdapterMismatchError, match="nothing was loaded"):
        mk.load_msplora(model, tmp_path / "other", adapter_name="f")
    assert mk.adapter_names(model) == names and mk.active_adapters(model) == ["default"]
    mk.set_adapter(model, ["default", "b"])
    with pytest.raises(ValueError, match="several adapters are active .* name one with adapter_name="):
        mk.adapter_state_dict(model)


def test_a_weighted_combination_is_the_weighted_sum_of_the_updates():
    model = three_adapters()
    weights = [0.7, -1.3]
    mk.add_weighted_adapter(model, ["default", "b"], weights, "mix")
    assert mk.active_adapters(model) == ["default"] and model.msplora_factors.configs["mix"].ranks == (12, 6, 4)
    for path in ["model.layers.0.self_attn.q_proj", "model.layers.4.self_attn.v_proj"]:
        layer = model.get_submodule(path)

        def update(name):
            return sum(lvl.scale * lvl.A.double() @ lvl.B.double() for lvl in layer.adapter_levels[name])

        want = weights[0] * update("default") + weights[1] * update("b")
        torch.testing.assert_close(update("mix"), want, rtol=1e-6, atol=1e-7)
    # Through the whole model: the sum with weights 1 is both adapters active together.
    mk.add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "sum")
    ids = tokens()
    mk.set_adapter(model, "sum")
    summed = model(ids).logits
    mk.set_adapter(model, ["default", "b"])
    torch.testing.assert_close(summed, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_export_and_the_transformers_attributes_follow_the_active_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = three_adapters()
    mk.set_adapter(model, "b")
    ids = tokens()
    adapted = model(ids).logits
    assert model.active_adapters() == ["b"] and set(model.peft_config) == {"default", "b", "c"}
    mk.export_peft(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    torch.testing.assert_close(theirs(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    mk.merge_adapter(model)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        mk.set_adapter(model, "c")
    mk.unmerge_adapter(model)
    mk.set_adapter(model, "c")
    model.save_pretrained(tmp_path / "pretrained")  # transformers' save: the active adapter alone
    fresh = mk.load_msplora(tiny_llama(), tmp_path / "pretrained").eval()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_trainer_resumes_an_adapter_that_is_not_default(tmp_path):
    from transformers import Trainer, TrainingArguments

    def run(out, resume=None):
        model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(**QV))
        _randomized(model, "default", 0)
        mk.apply_msplora(model, mk.MSPLoraConfig(**QV, ranks=(4, 2, 2), dropout=0.05), adapter_name="dpo")
        mk.set_adapter(model, "dpo")
        args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=8,
                                 learning_rate=2e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
        Trainer(model=model, args=args, train_dataset=CountingSequences(),
                callbacks=[mk.SaveAdapterCallback()]).train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", tmp_path / "full" / "checkpoint-2")
    for name in ["default", "dpo"]:
        want, got = mk.adapter_state_dict(full, name), mk.adapter_state_dict(resumed, name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in mk.adapter_state_dict(full, "dpo").items()
               if k.endswith(".B"))


def test_dpo_with_a_trained_adapter_as_the_reference(tmp_path):
    pytest.importorskip("trl")
    from dpo_runs import assert_shares_every_tensor, assert_starts_at_the_reference_and_learns, dpo_trainer

    torch.manual_seed(0)
    sft = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(**QV, dropout=0.0))
    _randomized(sft, "default", 0)
    mk.save_adapter(sft, tmp_path / "sft")
    # As TRL does it for PEFT: the SFT adapter loaded twice, once to train on and once, frozen, as
    # the reference.
    model = mk.load_msplora(tiny_llama(), tmp_path / "sft", adapter_name="train")
    mk.load_msplora(model, tmp_path / "sft", adapter_name="reference")
    assert mk.active_adapters(model) == ["train"]
    with pytest.raises(ValueError, match="'train' is active in the model, so it trains"):
        mk.shared_base_model(model, "train")
    reference = mk.shared_base_model(model, "reference")
    assert all(not t.requires_grad for t in mk.adapter_state_dict(model, "reference").values())
    assert_shares_every_tensor(reference, model)
    trainer = dpo_trainer(model, tmp_path / "out", steps=3, ref_model=reference)
    trainer.train()
    assert_starts_at_the_reference_and_learns(trainer)  # at step 0 the policy is the reference
    ids = tokens(vocab=19)
    with torch.no_grad():
        sft.eval()
        torch.testing.assert_close(reference(ids).logits, sft(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.eval()(ids).logits, sft(ids).logits, atol=1e-3)


def test_counts_merge_and_push_take_an_adapter_by_name(tmp_path):
    model = three_adapters()
    alone_counts = mk.summary(mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(**QV, ranks=(4, 2, 2))))["total"]
    assert mk.summary(model, "b")["total"] == alone_counts
    assert mk.summary(model)["total"] == mk.summary(model, "default")["total"] != alone_counts
    ids = tokens()
    mk.set_adapter(model, "b")
    want = model(ids).logits
    mk.set_adapter(model, "default")
    mk.merge_adapter(model, adapter_names="b")
    assert mk.active_adapters(model) == ["b"]
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    mk.unmerge_adapter(model)

    class Hub:  # huggingface_hub's HfApi, as far as push_to_hub uses it
        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, **kwargs):
            import shutil

            shutil.copytree(folder_path, tmp_path / "uploaded")

    mk.push_to_hub(model, "org/b", api=Hub(), adapter_name="c")
    pushed = mk.load_msplora(tiny_llama(), tmp_path / "uploaded")
    assert pushed.msplora_config.target_modules == "all-linear"
    assert "2/2/2" in (tmp_path / "uploaded" / "README.md").read_text()
