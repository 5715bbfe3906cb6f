"""Activation checkpointing with dropout: the recomputed forward redraws the same masks."""
import copy

import pytest
import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_llama, tokens


def _grads(model, ids, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", [b for b in mk.available_backends("cpu") if b != "triton"] + ["triton"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing_matches_plain_run(backend, reentrant):
    if backend not in mk.available_backends("cpu"):
        pytest.skip("triton needs TRITON_INTERPRET=1")
    base = tiny_llama(num_layers=3)
    model = mk.apply_msplora(base, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], dropout=0.3, backend=backend))
    randomize_adapter(model)
    model.train()
    ids = tokens()
    plain = _grads(model, ids, seed=5)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        ckpt.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    checkpointed = _grads(ckpt, ids, seed=5)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # Dropout is live: another seed gives other gradients.
    other = _grads(model, ids, seed=6)
    assert any((other[n] - plain[n]).abs().max() > 1e-4 for n in plain)
