"""TRL's DPOTrainer as the tests run it: the word tokenizer and preference pairs made in code,
a few steps on the CPU, and the checks every such run makes."""
import itertools

from text_data import preferences, word_tokenizer


def dpo_trainer(model, output_dir, *, steps, ref_model=None, precompute=False, callbacks=()):
    import trl

    args = trl.DPOConfig(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                         learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
                         precompute_ref_log_probs=precompute, dataloader_num_workers=0, seed=0)
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=word_tokenizer(),
                          train_dataset=preferences(), callbacks=list(callbacks))


def assert_starts_at_the_reference_and_learns(trainer):
    """The first loss is ln 2 (the policy equals its reference) and the loss falls from there."""
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert abs(losses[0] - 0.6931) < 1e-3 and losses[-1] < losses[0], losses


def assert_shares_every_tensor(reference, model):
    """Every parameter and buffer of `reference` is one of `model`'s: one copy of the base."""
    ours = {t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    theirs = list(itertools.chain(reference.parameters(), reference.buffers()))
    assert theirs and all(t.data_ptr() in ours for t in theirs)
