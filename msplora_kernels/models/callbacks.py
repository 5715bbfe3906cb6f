"""transformers.Trainer callbacks. transformers is imported only when this module is."""
from __future__ import annotations

import os

from .adapter_io import save_adapter, write_resume_index
from .factor_dtypes import restore_factor_dtypes


def trainer_callback_base():
    """transformers.TrainerCallback, or object where transformers is missing (the callbacks are then plain objects)."""
    try:
        from transformers import TrainerCallback
    except ImportError:
        return object
    return TrainerCallback


class SaveAdapterCallback(trainer_callback_base()):
    """Writes the adapter (adapter_config.json and adapter_model.safetensors) into every checkpoint
    folder the Trainer saves, so each checkpoint loads with load_msplora on a fresh base model, as
    PEFT's checkpoints do, and `trainer.train(resume_from_checkpoint=...)` resumes from it.

    Resuming: a transformers model with MSPLoRA saves only its adapter (transformers_adapter.py),
    and the Trainer resumes a model that is not a peft.PeftModel from the checkpoint's weights
    file or shard index, loaded non-strictly. So next to the adapter this writes a shard index
    (model.safetensors.index.json) that lists the adapter's tensors in adapter_model.safetensors:
    the Trainer loads exactly those, and the frozen base stays as the model has it (the Trainer
    logs the base's weights as missing from the checkpoint; they are meant to be).

    When training ends it also writes the final adapter (the best one, with load_best_model_at_end)
    into output_dir, as the last steps may not have reached a checkpoint.

    When the trainer is built, and again when training begins, it puts factors that a trainer
    cast behind the module's back (TRL casts a quantized model's trainable parameters to
    bfloat16) back in the dtype apply_msplora gave them (factor_dtypes.py): before a resumed
    optimizer state is loaded (it takes the parameters' dtype) and before the first step."""

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            restore_factor_dtypes(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            restore_factor_dtypes(model)

    def on_save(self, args, state, control, model=None, **kwargs):
        # Every process calls save_adapter: sharded (FSDP2, ZeRO-3) factors are gathered by all,
        # rank 0 writes.
        if model is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_adapter(model, folder)
            if not os.path.exists(os.path.join(folder, "model.safetensors")):
                write_resume_index(model, folder)  # every rank: other adapters' tensors are gathered

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            save_adapter(model, args.output_dir)
