"""Fine-tuning an MSPLoRA causal LM with TRL's SFTTrainer: offline, a tiny LLaMA and a data set and
tokenizer built in code; the adapter is saved by SaveAdapterCallback and loads on a fresh base."""

import pytest
import torch

import msplora_kernels as mk
from models import tiny_llama
from dpo_runs import assert_shares_every_tensor, assert_starts_at_the_reference_and_learns, dpo_trainer
from text_data import feedback, prompts, sentences, word_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

def test_sft_trainer_trains_and_saves_the_adapter(tmp_path):
    torch.manual_seed(0)
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules="all-linear", dropout=0.05))
    before = {k: v.detach().clone() for k, v in mk.adapter_state_dict(model).items()}
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=8,
                         learning_rate=5e-2, logging_steps=1, save_steps=6, report_to=[], max_length=16,
                         use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=word_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict({"text": sentences()}),
                             callbacks=[mk.SaveAdapterCallback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    after = mk.adapter_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.endswith(".B")), "a B factor did not train"
    for folder in ("checkpoint-6", "checkpoint-12", "."):
        assert (tmp_path / "out" / folder / "adapter_model.safetensors").is_file(), folder
    loaded = mk.load_msplora(tiny_llama(), tmp_path / "out")
    model.eval(), loaded.eval()
    ids = word_tokenizer()(sentences(3, seed=1), return_tensors="pt").input_ids
    # TRL trains in bf16 autocast by default (args.bf16), and leaves the trained model's forward
    # wrapped in it: the loaded adapter runs under the same autocast to give the same logits.
    assert args.bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loaded(ids).logits.float()
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_dpo_without_a_second_model_takes_the_base_as_reference(tmp_path):
    # With precompute_ref_log_probs, DPOTrainer scores the reference with the policy before
    # training: a new MSPLoRA adapter changes nothing at init, so that is the base model, and no
    # reference model is loaded (TRL would reload one from config._name_or_path otherwise, which
    # a model built in code does not have).
    torch.manual_seed(0)
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.0))
    trainer = dpo_trainer(model, tmp_path / "dpo", steps=4, precompute=True)
    assert trainer.ref_model is None
    trainer.train()
    assert_starts_at_the_reference_and_learns(trainer)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in mk.adapter_state_dict(model).items()
               if k.endswith(".B"))
    # The reference TRL precomputed is the adapter-off model's: the summed log-probabilities of
    # each completion's tokens after its prompt, scored here with the trained adapter disabled.
    rows = trainer.train_dataset
    model.eval()

    with torch.no_grad():
        with mk.disable_adapters(model):
            base = [_completion_logps(model, row, "chosen_ids") for row in rows]
        adapted = [_completion_logps(model, row, "chosen_ids") for row in rows]
    ref = torch.tensor(rows["ref_chosen_logps"])
    torch.testing.assert_close(torch.stack(base), ref, rtol=1e-4, atol=1e-4)
    assert (torch.stack(adapted) - ref).abs().max() > 1e-2  # the trained adapter would score otherwise


def test_grpo_generates_with_the_factors_each_step_trained(tmp_path):
    # GRPOTrainer alternates TRL's own generation (no_grad: the layer's path without autograd, with
    # the levels joined once) and optimizer steps; the joined factors must follow every step.
    torch.manual_seed(0)
    tok = word_tokenizer()
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.0))

    def distinct_words(completions, **kwargs):
        return [float(len(set(c.split()))) for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=3, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=6, learning_rate=5e-2, logging_steps=1,
                          report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=distinct_words, args=args, processing_class=tok,
                              train_dataset=prompts())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and any(entry["loss"] != 0 for entry in logged), logged
    assert any(v.abs().max() > 0 for k, v in mk.adapter_state_dict(model).items() if k.endswith(".B"))
    ids = tok(["the big cat sat"], return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        without_autograd = model(ids).logits
    torch.testing.assert_close(without_autograd, model(ids).logits.detach(), rtol=1e-5, atol=1e-5)


def _completion_logps(model, row, completion):
    """The summed log-probabilities of a completion's tokens after its prompt, as TRL scores them."""
    ids = torch.tensor([row["prompt_ids"] + row[completion]])
    logps = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(row["prompt_ids"]) - 1:].sum()


@pytest.mark.parametrize("source", ["built in code", "loaded from a folder"])
def test_dpo_scores_the_reference_with_the_shared_base_model(source, tmp_path):
    # Without precompute_ref_log_probs TRL scores the reference at every step; for a model that is
    # not a peft.PeftModel it would load a second base from config._name_or_path. The shared base
    # model is that reference with no second copy of the weights.
    torch.manual_seed(0)
    base = tiny_llama()
    if source == "loaded from a folder":
        base.save_pretrained(tmp_path / "base")
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = mk.apply_msplora(base, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.0))
    reference = mk.shared_base_model(model)
    assert_shares_every_tensor(reference, model)  # one copy of the base in the process
    trainer = dpo_trainer(model, tmp_path / "dpo", steps=4, ref_model=reference)
    trainer.train()
    assert_starts_at_the_reference_and_learns(trainer)
    # After training, the reference still scores as the policy with its adapter off, and the policy
    # does not.
    model.eval()
    rows = trainer.train_dataset
    with torch.no_grad():
        ref = torch.stack([_completion_logps(reference, row, "chosen_ids") for row in rows])
        with mk.disable_adapters(model):
            off = torch.stack([_completion_logps(model, row, "chosen_ids") for row in rows])
        on = torch.stack([_completion_logps(model, row, "chosen_ids") for row in rows])
    assert torch.equal(ref, off)
    assert (on - ref).abs().max() > 1e-2


def test_kto_trains_against_the_shared_base_model(tmp_path):
    torch.manual_seed(0)
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.0))
    before = {k: v.detach().clone() for k, v in mk.adapter_state_dict(model).items()}
    args = trl.KTOConfig(output_dir=str(tmp_path / "kto"), max_steps=4, per_device_train_batch_size=8,
                         learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                         dataloader_num_workers=0, seed=0)
    trainer = trl.KTOTrainer(model=model, ref_model=mk.shared_base_model(model), args=args,
                             processing_class=word_tokenizer(), train_dataset=feedback())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    after = mk.adapter_state_dict(model)
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.endswith(".B"))


def test_the_shared_base_model_refuses_a_merged_adapter():
    model = mk.apply_msplora(tiny_llama(), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    mk.merge_adapter(model)
    with pytest.raises(ValueError, match="shared_base_model: .* merged .*unmerge_adapter"):
        mk.shared_base_model(model)
