"""A short transformers.Trainer run on a tiny model with MSPLoRA."""
import torch
from torch.utils.data import Dataset

import msplora_kernels as mk
from models import tiny_bert


class Toy(Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 3).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(modules_to_save=["classifier"], dropout=0.1))
    base = {k: v.clone() for k, v in model.state_dict().items() if k not in mk.adapter_state_dict(model)}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Toy())
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert any(k.endswith(".B") and v.abs().sum() > 0 for k, v in mk.adapter_state_dict(model).items())


def _checkpointing_run(out_dir, resume_from=None):
    from transformers import Trainer, TrainingArguments

    from msplora_kernels.models.callbacks import SaveAdapterCallback

    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(modules_to_save=["classifier"], dropout=0.1))
    args = TrainingArguments(output_dir=str(out_dir), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Toy(), callbacks=[SaveAdapterCallback()]).train(
        resume_from_checkpoint=resume_from)
    return model


def test_trainer_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path):
    full = _checkpointing_run(tmp_path / "full")
    final = mk.adapter_state_dict(full)
    # Every checkpoint folder loads on a fresh base model, as a PEFT checkpoint does.
    from_ckpt = mk.adapter_state_dict(mk.load_msplora(tiny_bert(), tmp_path / "full" / "checkpoint-4"))
    assert from_ckpt.keys() == final.keys() and all(torch.equal(from_ckpt[k], final[k]) for k in final)
    # And output_dir gets the final adapter when training ends.
    from_out = mk.adapter_state_dict(mk.load_msplora(tiny_bert(), tmp_path / "full"))
    assert from_out.keys() == final.keys() and all(torch.equal(from_out[k], final[k]) for k in final)
    halfway = mk.adapter_state_dict(mk.load_msplora(tiny_bert(), tmp_path / "full" / "checkpoint-2"))
    assert any(not torch.equal(halfway[k], final[k]) for k in final)
    # Resuming from the Trainer's own checkpoint (optimizer, scheduler, RNG, dropout seeds) is exact.
    resumed = mk.adapter_state_dict(_checkpointing_run(tmp_path / "resumed", tmp_path / "full" / "checkpoint-2"))
    assert all(torch.equal(resumed[k], final[k]) for k in final)
