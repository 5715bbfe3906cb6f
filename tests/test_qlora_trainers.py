"""QLoRA as users run it: a model loaded by transformers with a BitsAndBytesConfig, adapted with
apply_msplora, trained by the stock transformers.Trainer and TRL's SFTTrainer (checkpoints,
resume, reload), on the CPU with a tiny LLaMA written in the test."""
import pytest
import torch

import msplora_kernels as mk
from models import CountingSequences, tokens
from quantized_models import KINDS, from_pretrained_quantized, write_checkpoint

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

CONFIG = dict(target_modules=["q_proj", "v_proj"], ranks=(8, 4, 2), lora_alpha=16, dropout=0.05)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def _args(out, **overrides):
    settings = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, learning_rate=2e-2,
                    logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**settings, **overrides})


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_the_trainer_trains_a_model_quantized_by_transformers(checkpoint, kind, gradient_checkpointing, tmp_path):
    model = mk.apply_msplora(from_pretrained_quantized(checkpoint, kind), mk.MSPLoraConfig(**CONFIG))
    q_proj = model.model.layers[0].self_attn.q_proj
    quantized_before = q_proj.base_layer.weight.detach().clone()
    args = _args(tmp_path, activation_checkpointing=gradient_checkpointing)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingSequences(),
                                   callbacks=[mk.SaveAdapterCallback()])
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert torch.equal(q_proj.base_layer.weight, quantized_before)  # the 4-/8-bit base is frozen
    assert all(t.dtype == torch.float32 for t in mk.adapter_state_dict(model).values())
    for folder in ("checkpoint-3", "checkpoint-6"):
        # The adapter alone, as for a PEFT model: no copy of the quantized base per checkpoint.
        assert (tmp_path / folder / "adapter_model.safetensors").is_file()
        assert not (tmp_path / folder / "model.safetensors").exists()
    reloaded = mk.load_msplora(from_pretrained_quantized(checkpoint, kind), tmp_path).eval()
    ids = tokens()
    assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def _run(checkpoint, kind, out, resume_from=None):
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint) if kind == "float" else \
        from_pretrained_quantized(checkpoint, kind)
    model = mk.apply_msplora(base, mk.MSPLoraConfig(**CONFIG))
    trainer = transformers.Trainer(model=model, args=_args(out), train_dataset=CountingSequences(),
                                   callbacks=[mk.SaveAdapterCallback()])
    trainer.train(resume_from_checkpoint=resume_from)
    return model, trainer


@pytest.mark.parametrize("kind", ["float", "nf4-double"])
def test_resuming_from_a_checkpoint_continues_exactly(checkpoint, kind, tmp_path):
    full, full_trainer = _run(checkpoint, kind, tmp_path / "full")
    resumed, resumed_trainer = _run(checkpoint, kind, tmp_path / "resumed", tmp_path / "full" / "checkpoint-3")
    assert resumed_trainer.state.global_step == 6
    # The resumed run took the checkpoint's adapter, optimizer moments, scheduler and RNG (dropout):
    # its steps 4-6 are the full run's, bit for bit (its log holds steps 1-3 from the checkpoint).
    assert len(_losses(full_trainer)) == 6 and _losses(resumed_trainer) == _losses(full_trainer)
    want, got = mk.adapter_state_dict(full), mk.adapter_state_dict(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)
    moments = lambda trainer: [t for s in trainer.optimizer.state_dict()["state"].values()  # noqa: E731
                               for t in (s["exp_avg"], s["exp_avg_sq"])]
    assert all(torch.equal(a, b) for a, b in zip(moments(resumed_trainer), moments(full_trainer), strict=True))


def test_without_the_callback_resuming_fails_loudly_not_silently(checkpoint, tmp_path):
    model = mk.apply_msplora(from_pretrained_quantized(checkpoint, "nf4-double"), mk.MSPLoraConfig(**CONFIG))
    transformers.Trainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=CountingSequences()).train()
    fresh = mk.apply_msplora(from_pretrained_quantized(checkpoint, "nf4-double"), mk.MSPLoraConfig(**CONFIG))
    # transformers' own adapters (model.add_adapter) fail here the same way: the Trainer resumes
    # only a peft.PeftModel from an adapter file.
    with pytest.raises(ValueError, match="checkpoint index"):
        transformers.Trainer(model=fresh, args=_args(tmp_path, max_steps=6), train_dataset=CountingSequences()).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_trls_sft_trainer_trains_a_quantized_model_and_the_factors_stay_float32(checkpoint, gradient_checkpointing,
                                                                               tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from text_data import sentences, word_tokenizer

    model = mk.apply_msplora(from_pretrained_quantized(checkpoint, "nf4-double"), mk.MSPLoraConfig(**CONFIG))
    before = {k: v.detach().clone() for k, v in mk.adapter_state_dict(model).items()}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, learning_rate=5e-2,
                         logging_steps=1, save_steps=4, report_to=[], max_length=16, use_cpu=True, bf16=False,
                         activation_checkpointing=gradient_checkpointing, dataloader_num_workers=0, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=word_tokenizer(),
                             train_dataset=datasets.Dataset.from_dict({"text": sentences()}),
                             callbacks=[mk.SaveAdapterCallback()])
    # TRL casts a quantized model's trainable parameters to bfloat16 in its __init__; the callback
    # puts the factors back in the dtype apply_msplora chose before any optimizer state exists.
    assert all(t.dtype == torch.float32 for t in mk.adapter_state_dict(model).values())
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    after = mk.adapter_state_dict(model)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.endswith(".B"))
    reloaded = mk.load_msplora(from_pretrained_quantized(checkpoint, "nf4-double"), tmp_path / "checkpoint-8").eval()
    ids = word_tokenizer()(sentences(3, seed=1), return_tensors="pt").input_ids
    assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_what_trl_casts_is_what_the_callback_restores(checkpoint, tmp_path):
    # The defect the callback mends, shown without it: TRL's cast leaves bfloat16 factors.
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from text_data import sentences, word_tokenizer

    model = mk.apply_msplora(from_pretrained_quantized(checkpoint, "nf4-double"), mk.MSPLoraConfig(**CONFIG))
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, bf16=False, max_length=16)
    trl.SFTTrainer(model=model, args=args, processing_class=word_tokenizer(),
                   train_dataset=datasets.Dataset.from_dict({"text": sentences(8)}))
    assert {t.dtype for t in mk.adapter_state_dict(model).values()} == {torch.bfloat16}
    from msplora_kernels.models.factor_dtypes import restore_factor_dtypes

    assert len(restore_factor_dtypes(model)) == len(mk.adapter_state_dict(model))
    assert {t.dtype for t in mk.adapter_state_dict(model).values()} == {torch.float32}


def test_dpo_on_a_quantized_model_with_the_shared_base_as_reference(checkpoint, tmp_path):
    pytest.importorskip("trl")
    from dpo_runs import assert_starts_at_the_reference_and_learns, dpo_trainer

    model = mk.apply_msplora(from_pretrained_quantized(checkpoint, "nf4-double"),
                             mk.MSPLoraConfig(**{**CONFIG, "dropout": 0.0}))
    reference = mk.shared_base_model(model)
    trainer = dpo_trainer(model, tmp_path, steps=3, ref_model=reference, callbacks=[mk.SaveAdapterCallback()])
    trainer.train()
    assert_starts_at_the_reference_and_learns(trainer)
    assert all(t.dtype == torch.float32 for t in mk.adapter_state_dict(model).values())
    ids = tokens()
    model.eval()
    with torch.no_grad(), mk.disable_adapters(model):
        off = model(ids).logits
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, off)
        assert not torch.equal(model(ids).logits, off)
