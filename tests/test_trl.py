"""Fine-tuning an MSPLoRA causal LM with TRL's SFTTrainer: offline, a tiny LLaMA and a data set and
tokenizer built in code; the adapter is saved by SaveAdapterCallback and loads on a fresh base."""
import pytest
import torch

import msplora_kernels as mk
from models import tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "log", "a", "big", "small", "red", "blue", "and", "then"]


def word_tokenizer():
    """A word-level tokenizer over WORDS, made in code (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def sentences(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    return [f"the {pick(['big', 'small'])} {pick(['cat', 'dog'])} {pick(['sat', 'ran'])} on the "
            f"{pick(['red', 'blue'])} {pick(['mat', 'log'])}" for _ in range(n)]


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
