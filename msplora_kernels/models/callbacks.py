"""transformers.Trainer callbacks. transformers is imported only when this module is."""
from __future__ import annotations

import os

from .adapter_io import save_adapter


def trainer_callback_base():
    """transformers.TrainerCallback, or object where transformers is missing (the callbacks are then plain objects)."""
    try:
        from transformers import TrainerCallback
    except ImportError:
        return object
    return TrainerCallback


class SaveAdapterCallback(trainer_callback_base()):
    """Writes the adapter (adapter_config.json and adapter_model.safetensors) into every checkpoint
    folder the Trainer saves, so each checkpoint can be loaded with load_msplora on a fresh base
    model, as PEFT's checkpoints can. The Trainer's own files there still resume training.

    When training ends it also writes the final adapter (the best one, with load_best_model_at_end)
    into output_dir: Trainer.save_model writes the whole model there, which load_msplora cannot
    read, and the last steps may not have reached a checkpoint."""

    def on_save(self, args, state, control, model=None, **kwargs):
        # Every process calls save_adapter: sharded (FSDP2) factors are gathered by all, rank 0 writes.
        if model is not None:
            save_adapter(model, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            save_adapter(model, args.output_dir)
