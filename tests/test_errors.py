"""The catalogue of errors users can hit (docs/errors.md): each row of that table is a case here,
and each case checks the exception type and the message the table quotes."""
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import msplora_kernels as mk
from helpers import make_problem
from models import tiny_bert, tiny_llama

ERRORS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def _problem():
    return make_problem((4,), 16, 12, (4, 2), torch.float32)


def e_last_dim():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(torch.randn(4, 15), w, b, As, Bs, s)


def e_rank_mismatch():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, As, [Bs[0], torch.randn(3, 12)], s)


def e_factor_shape():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, [torch.randn(15, 4), As[1]], Bs, s)


def e_lengths():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, As, Bs[:1], s)


def e_bias():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, torch.randn(11), As, Bs, s)


def e_int_dtype():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(torch.ones(4, 16, dtype=torch.int32), w, b, As, Bs, s)


def e_dtype_mismatch():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x.double(), w, b, As, Bs, s)


def e_device():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, [As[0], torch.empty(16, 2, device="meta")], Bs, s)


def e_dropout():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, As, Bs, s, dropout_p=1.0, training=True)


def e_unknown_backend():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, As, Bs, s, backend="cudnn")


def e_unavailable_backend():
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, As, Bs, s, backend="cuda")


def e_backend_dtype():
    if "triton" not in mk.available_backends("cpu"):
        pytest.skip("triton is not available (on the CPU it needs TRITON_INTERPRET=1)")
    x, w, b, As, Bs, s = make_problem((4,), 16, 12, (4, 2), torch.float64)
    mk.msplora_linear(x, w, b, As, Bs, s, backend="triton")


def e_direct_op():
    torch.ops.msplora.shrink(torch.randn(4, 16), torch.randn(15, 3), 0.0, torch.empty(0, dtype=torch.int64))


def e_config():
    mk.MSPLoraConfig(groups=(3, 1, None))


def e_no_target():
    mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(target_modules=["q_proj"]))


def e_shared_shape():
    model = tiny_llama()
    model.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj"]))


def e_quantized_base():
    # A quantized layer of a library other than bitsandbytes: an nn.Linear holding an integer weight.
    model = tiny_llama()
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.weight = torch.nn.Parameter(torch.randint(-8, 8, q_proj.weight.shape, dtype=torch.int8), requires_grad=False)
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj"]))


def e_rank_pattern_splits_a_level():
    config = mk.MSPLoraConfig(target_modules=["q_proj"], rank_pattern={r"layers\.0\.self_attn\.q_proj": (16, 4, 2)})
    mk.apply_msplora(tiny_llama(), config)


def e_outside_a_stack():
    # A module list of a name apply_msplora does not know (OpenCLIP's resblocks).
    model = torch.nn.Module()
    model.resblocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
    mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["0", "1"]))


def _saved(tmp_path, **cfg):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(**cfg))
    mk.save_adapter(model, tmp_path)
    return model


def e_adapter_config(tmp_path):
    _saved(tmp_path)
    mk.load_adapter(mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(ranks=(8, 4, 1))), tmp_path)


def e_adapter_tensors(tmp_path):
    _saved(tmp_path)
    mk.load_adapter(mk.apply_msplora(tiny_bert(hidden=48), mk.MSPLoraConfig()), tmp_path)


def e_adapter_corrupt(tmp_path):
    model = _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    mk.load_adapter(model, tmp_path)


def e_adapter_keys(tmp_path):
    model = _saved(tmp_path)
    save_file({"bert.encoder.layer.0.attention.self.query.own_levels.2.A": torch.zeros(32, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    mk.load_adapter(model, tmp_path)


# id: (trigger, exception, the message as docs/errors.md quotes it)
CATALOGUE = {
    "E01": (e_last_dim, ValueError, "x has last dimension 15 (shape (4, 15)) but weight has shape (12, 16)"),
    "E02": (e_rank_mismatch, ValueError, "rank mismatch at level 1: As[1] has shape (16, 2) (rank 2) but Bs[1] has shape (3, 12) (rank 3)"),
    "E03": (e_factor_shape, ValueError, "As[0] has shape (15, 4) but in_features is 16"),
    "E04": (e_lengths, ValueError, "As, Bs and scales must have the same length, got 2, 1 and 2"),
    "E05": (e_bias, ValueError, "bias has shape (11,) but weight has shape (12, 16)"),
    "E06": (e_int_dtype, TypeError, "x must be floating point, got dtype torch.int32"),
    "E07": (e_dtype_mismatch, mk.DtypeMismatchError, "expected m1 and m2 to have the same dtype, but got: torch.float64 != torch.float32"),
    "E08": (e_device, ValueError, "As[1] is on meta but x is on cpu"),
    "E09": (e_dropout, ValueError, "dropout_p must be a float in [0, 1), got 1.0"),
    "E10": (e_unknown_backend, ValueError, "unknown backend backend='cudnn'"),
    "E11": (e_unavailable_backend, RuntimeError, "backend backend='cuda' is not available for device cpu"),
    "E12": (e_backend_dtype, TypeError, "backend backend='triton' computes in"),
    "E13": (e_direct_op, RuntimeError, "a.size(0) vs x.size(1) (in_features) mismatch: 15 vs 16"),
    "E14": (e_config, ValueError, "groups must not decrease from level to level, got (3, 1, None)"),
    "E15": (e_no_target, ValueError, "no nn.Linear or Conv1D matches target_modules=('q_proj',)"),
    "E16": (e_shared_shape, ValueError, "would share level 0 of target 'q_proj' but differ in shape"),
    "E17": (e_adapter_config, mk.AdapterMismatchError, "differs from the model's config: ranks: file [8, 4, 2] vs model [8, 4, 1]"),
    "E18": (e_adapter_tensors, mk.AdapterMismatchError, "shape mismatch:"),
    "E19": (e_adapter_keys, mk.AdapterMismatchError, "missing from the file:"),
    "E20": (e_adapter_corrupt, mk.AdapterMismatchError, "is corrupted or truncated"),
    "E21": (e_quantized_base, TypeError, "model.layers.1.self_attn.q_proj (torch.nn.modules.linear.Linear) has a "
                                         "torch.int8 weight of shape (32, 32); MSPLoRA takes floating-point base "
                                         "layers and bitsandbytes Linear4bit (nf4, fp4) and Linear8bitLt"),
    "E22": (e_rank_pattern_splits_a_level, ValueError, "rank_pattern gives model.layers.0.self_attn.q_proj rank 16 and "
            "model.layers.1.self_attn.q_proj rank 8 at level 0, which they share"),
    "E23": (e_outside_a_stack, ValueError, "'resblocks.0' is not inside a stack of layers"),
}


@pytest.mark.parametrize("eid", sorted(CATALOGUE))
def test_catalogued_error(eid, tmp_path):
    trigger, exc, message = CATALOGUE[eid]
    with pytest.raises(exc) as info:
        trigger(tmp_path) if "tmp_path" in trigger.__code__.co_varnames else trigger()
    assert message in str(info.value), str(info.value)


def test_readme_table_matches_catalogue():
    rows = {}
    for line in ERRORS_PAGE.read_text().splitlines():
        m = re.match(r"\| (E\d\d) \| .* \| `(\w+)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    assert sorted(rows) == sorted(CATALOGUE), "docs/errors.md's table and tests/test_errors.py disagree"
    for eid, (exc_name, quoted) in rows.items():
        _, exc, message = CATALOGUE[eid]
        assert exc_name == exc.__name__, eid
        assert quoted.strip("`").replace("\\|", "|") == message, eid


def test_a_refused_base_leaves_the_model_untouched():
    model = tiny_llama()
    model.model.layers[3].self_attn.v_proj.weight = torch.nn.Parameter(
        torch.zeros(16, 32, dtype=torch.uint8), requires_grad=False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="model.layers.3.self_attn.v_proj"):
        mk.apply_msplora(model, mk.MSPLoraConfig(target_modules=["q_proj", "v_proj"]))
    assert not any(isinstance(m, mk.MSPLoraLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_adapter_failure_loads_nothing(tmp_path):
    model = _saved(tmp_path)
    other = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())
    before = {k: v.clone() for k, v in mk.adapter_state_dict(other).items()}
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(mk.AdapterMismatchError):
        mk.load_adapter(other, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in mk.adapter_state_dict(other).items())
    assert model is not other


def test_layer_config_errors():
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        mk.MSPLoraLinear(8, 8, ranks=(4, 0))
    with pytest.raises(ValueError, match="lora_alpha has 2 entries but there are 3 levels"):
        mk.MSPLoraLinear(8, 8, ranks=(4, 2, 1), lora_alpha=(16, 16))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        mk.MSPLoraLinear.from_linear(torch.nn.Conv1d(2, 2, 1))


def test_direct_op_calls_are_checked_in_cpp():
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.msplora.grad_a(torch.randn(2, 3, 4), torch.randn(2, 3), 0.0, torch.empty(0, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor of one element"):
        torch.ops.msplora.shrink(x, torch.randn(16, 3), 0.5, torch.empty(0, dtype=torch.int64))


def test_a_call_that_passed_does_not_wave_through_a_bad_one():
    # check_inputs skips argument sets whose signature passed before (validation.py); any change
    # the checks read must still be caught, with its own message.
    x, w, b, As, Bs, s = _problem()
    mk.msplora_linear(x, w, b, As, Bs, s)
    mk.msplora_linear(x, w, b, As, Bs, s)
    with pytest.raises(ValueError, match=r"rank mismatch at level 1"):
        mk.msplora_linear(x, w, b, As, [Bs[0], torch.randn(3, 12)], s)
    with pytest.raises(ValueError, match=r"x has last dimension 15"):
        mk.msplora_linear(torch.randn(4, 15), w, b, As, Bs, s)
    with pytest.raises(TypeError, match=r"scales\[0\] must be a finite float"):
        mk.msplora_linear(x, w, b, As, Bs, [float("nan"), s[1]])
    with pytest.raises(ValueError, match=r"bias has shape \(11,\)"):
        mk.msplora_linear(x, w, b[:11], As, Bs, s)
    with pytest.raises(ValueError, match=r"dropout_p must be a float in \[0, 1\)"):
        mk.msplora_linear(x, w, b, As, Bs, s, dropout_p=1.5)
