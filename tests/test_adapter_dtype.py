"""Factors on a bfloat16 base are kept in float32 (PEFT's autocast_adapter_dtype), computed in bf16."""
import copy

import torch

import msplora_kernels as mk
from models import randomize_adapter, tiny_llama, tokens

CONFIG = mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"], ranks=(8, 4, 2))


def bf16_llama(seed=0):
    return tiny_llama(seed=seed).to(torch.bfloat16)


def test_factors_are_float32_on_a_bf16_base_and_bf16_when_asked():
    model = mk.apply_msplora(bf16_llama(), CONFIG)
    adapter = mk.adapter_state_dict(model)
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    kept = mk.apply_msplora(bf16_llama(), CONFIG, autocast_adapter_dtype=False)
    assert {t.dtype for t in mk.adapter_state_dict(kept).values()} == {torch.bfloat16}


def test_float32_factors_compute_what_their_bf16_cast_computes():
    torch.manual_seed(1)
    fp32_adapter = mk.apply_msplora(bf16_llama(), CONFIG)
    randomize_adapter(fp32_adapter)
    bf16_adapter = mk.apply_msplora(bf16_llama(), CONFIG, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in mk.adapter_state_dict(bf16_adapter).items():
            p.copy_(mk.adapter_state_dict(fp32_adapter)[name])
    ids = tokens()
    out32 = fp32_adapter(input_ids=ids, labels=ids)
    out16 = bf16_adapter(input_ids=ids, labels=ids)
    assert out32.logits.dtype == torch.bfloat16
    # The kernels run in bf16 either way: fp32 factors are scaled, then rounded to bf16 once; bf16
    # factors are rounded, then scaled. With power-of-two scales (16/8, 16/4, 16/2) scaling is exact,
    # so the two forwards are the same computation, bit for bit.
    assert torch.equal(out32.logits, out16.logits)
    out32.loss.backward()
    out16.loss.backward()
    for name, p in mk.adapter_state_dict(fp32_adapter).items():
        q = mk.adapter_state_dict(bf16_adapter)[name]
        assert p.grad.dtype == torch.float32 and q.grad.dtype == torch.bfloat16
        # Shared levels sum their layers' gradients in fp32 on one side and bf16 on the other.
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=2e-2, atol=1e-3, msg=name)


def test_small_updates_survive_in_float32_factors():
    # One AdamW step moves every element by lr; most bf16 values near 0.1 cannot move by 1e-4.
    fractions = {}
    for autocast in (True, False):
        model = mk.apply_msplora(bf16_llama(), CONFIG, autocast_adapter_dtype=autocast)
        randomize_adapter(model)
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        ids = tokens()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0).step()
        changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
        fractions[autocast] = changed / sum(p.numel() for p in params)
    assert fractions[True] > 0.99 and fractions[False] < 0.5, fractions


def test_save_load_and_merge_keep_float32_factors(tmp_path):
    model = mk.apply_msplora(bf16_llama(), CONFIG)
    randomize_adapter(model)
    mk.save_adapter(model, tmp_path)
    loaded = mk.load_msplora(bf16_llama(), tmp_path)
    saved = mk.adapter_state_dict(model)
    for name, t in mk.adapter_state_dict(loaded).items():
        assert t.dtype == torch.float32 and torch.equal(t, saved[name]), name

    ids = tokens()
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits.float()
        merged = mk.merge_and_unload(copy.deepcopy(loaded))(input_ids=ids).logits.float()
        base = bf16_llama()(input_ids=ids).logits.float()
    assert (adapted - base).abs().max() > 0.2  # the adapter's effect is far above the tolerance below
    assert {p.dtype for p in mk.merge_and_unload(loaded).parameters()} == {torch.bfloat16}
    # Merging rounds W + delta to bf16 once; the adapted forward rounds at other places.
    torch.testing.assert_close(merged, adapted, rtol=1e-2, atol=1e-2)


def test_joined_factors_are_each_level_scaled_by_its_float_then_cast_once():
    # The Function joins the levels with a row of scales in place where every scale is as exact in
    # the factors' dtype as in its op-math type, and level by level otherwise; either way the values
    # must be each level times its Python float, cast to x's dtype once.
    import random

    from msplora_kernels.ops.autograd import joined_factors

    rng = random.Random(3)
    scale_sets = [(2.0, 4.0, 8.0), (16 / 3, 1.7, 0.1), (16 / 8**0.5, 8.0, 16 / 2**0.5),
                  tuple(rng.uniform(0.01, 40.0) for _ in range(3))]
    for factor_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for scales in scale_sets:
            As = [torch.randn(48, r, dtype=factor_dtype) * 3 for r in (8, 4, 2)]
            Bs = [torch.randn(r, 40, dtype=factor_dtype) for r in (8, 4, 2)]
            for x_dtype in {factor_dtype, torch.bfloat16, torch.float32}:
                a, b = joined_factors(As, Bs, scales, x_dtype)
                expected = torch.cat([a_i * s for a_i, s in zip(As, scales)], dim=1).to(x_dtype)
                assert torch.equal(a, expected), (factor_dtype, scales, x_dtype)
                assert torch.equal(b, torch.cat(Bs).to(x_dtype))


def test_factors_cast_behind_the_modules_back_are_restored_and_a_conversion_is_kept():
    from msplora_kernels.models.factor_dtypes import restore_factor_dtypes

    model = mk.apply_msplora(tiny_llama().to(torch.bfloat16), mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    randomize_adapter(model)
    factors = mk.adapter_state_dict(model)
    want = {k: v.detach().clone() for k, v in factors.items()}
    for p in factors.values():  # what TRL's trainers do to a quantized model's trainable parameters
        p.data = p.data.to(torch.bfloat16)
    assert sorted(restore_factor_dtypes(model)) == sorted(factors)
    for k, p in mk.adapter_state_dict(model).items():
        assert p.dtype == torch.float32 and torch.equal(p, want[k].to(torch.bfloat16).float())
    # A conversion through the module is the user's choice, and stays.
    model.bfloat16()
    assert restore_factor_dtypes(model) == []
    assert {p.dtype for p in mk.adapter_state_dict(model).values()} == {torch.bfloat16}
