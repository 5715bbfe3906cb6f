"""Triton-specific paths on the CPU under TRITON_INTERPRET=1: wide ranks, dtype refusal, opcheck."""
import pytest
import torch

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem
from msplora_kernels.ops import settings
from msplora_kernels.ops.backends import BACKENDS

pytestmark = pytest.mark.skipif(
    "triton" not in mk.available_backends("cpu"), reason="triton is not importable or TRITON_INTERPRET is not 1"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_total_rank_above_one_rank_block(dtype):
    # R = 150 > 128 spans two rank blocks in every kernel.
    problem = make_problem((45,), 36, 20, (100, 40, 10), dtype)
    check_backend_against_reference("triton", problem, dropout_p=0.2, training=True, rng_seed=3)


def test_rows_split_across_programs_in_grad_a():
    # Enough rows that the dA reduction is split over several programs that meet by atomics.
    problem = make_problem((1000,), 16, 8, (5, 3), torch.float32)
    check_backend_against_reference("triton", problem)


@pytest.mark.parametrize("forward", ["split", "onepass"])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trained"])
def test_weight_stored_in_out(forward, train_base):
    # A Conv1D base (GPT-2) hands the kernels the transposed view of its (in, out) weight.
    problem = make_problem((3, 7), 24, 40, (8, 4, 2), torch.float32, weight_in_out=True, train_base=train_base)
    assert not problem[1].is_contiguous()
    with settings.overridden(triton_forward=forward):
        check_backend_against_reference("triton", problem, dropout_p=0.2, training=True)


def test_float64_is_refused_by_name_and_skipped_by_automatic_choice():
    x, w, b, As, Bs, s = make_problem((3,), 8, 8, (2,), torch.float64)
    with pytest.raises(TypeError, match="backend='triton' computes in"):
        mk.msplora_linear(x, w, b, As, Bs, s, backend="triton")
    from msplora_kernels.ops.backends import resolve_backend

    assert resolve_backend(None, "cpu", torch.float64) != "triton"


def test_opcheck_schema_triton_ops():
    # Fake-tensor and AOT checks need compiled kernels (the interpreter touches real
    # data pointers); tests/test_gpu.py runs the full opcheck on a GPU.
    ops = torch.ops.msplora_triton
    x, a = torch.randn(40, 24), torch.randn(24, 7)
    seed = torch.tensor([5], dtype=torch.int64)
    w, b, bias = torch.randn(20, 24), torch.randn(7, 20), torch.randn(20)
    t = ops.shrink(x, a, 0.0, seed)
    dy = torch.randn(40, 20)
    dt, _ = ops.grad_t_b(dy, t, b)
    cases = [
        (torch.ops.msplora_triton.shrink, (x, a, 0.3, seed)),
        (torch.ops.msplora_triton.expand_linear, (x, w, bias, t, b)),
        (torch.ops.msplora_triton.grad_t_b, (dy, t, b)),
        (torch.ops.msplora_triton.grad_x, (dy, w, dt, a, 0.3, seed)),
        (torch.ops.msplora_triton.grad_a, (x, dt, 0.3, seed)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema",))


@pytest.fixture
def one_pass():
    with settings.overridden(triton_forward="onepass"):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("ranks,dropout", [((8, 4, 2), 0.0), ((8, 4, 2), 0.25), ((7, 3), 0.1), ((20, 9, 3), 0.0)],
                         ids=["r14", "r14-dropout", "r10-dropout", "r32"])
def test_one_pass_forward_matches_reference(one_pass, dtype, ranks, dropout):
    # Sizes off every block multiple; several column tiles, so T comes from tile 0 and y from all.
    problem = make_problem((3, 29), 45, 70, ranks, dtype)
    check_backend_against_reference("triton", problem, dropout_p=dropout, training=dropout > 0, rng_seed=11)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_one_pass_forward_gives_the_two_kernel_y_and_t(dropout):
    ops = torch.ops.msplora_triton
    x, w, bias = torch.randn(70, 50), torch.randn(90, 50) / 7, torch.randn(90)
    a, b = torch.randn(50, 14) / 7, torch.randn(14, 90) * 0.2
    seed = torch.tensor([77], dtype=torch.int64)
    y, t = ops.shrink_expand_linear(x, w, bias, a, b, dropout, seed)
    t_split = ops.shrink(x, a, dropout, seed)
    torch.testing.assert_close(t, t_split, rtol=1e-5, atol=1e-5)  # the same mask, the same sums
    torch.testing.assert_close(y, ops.expand_linear(x, w, bias, t_split, b), rtol=1e-5, atol=1e-5)
    assert t.abs().sum() > 0 and y.abs().sum() > 0


def test_one_pass_forward_is_not_used_above_its_rank_or_by_default():
    from msplora_kernels.triton_kernels import configs

    triton, ops = BACKENDS["triton"], torch.ops.msplora_triton
    assert not triton.one_pass_forward(14)
    with settings.overridden(triton_forward="onepass"):
        assert triton.one_pass_forward(configs.ONE_PASS_MAX_RANK)
        assert not triton.one_pass_forward(configs.ONE_PASS_MAX_RANK + 1)
        x, w, a, b = torch.randn(8, 16), torch.randn(12, 16), torch.randn(16, 40), torch.randn(40, 12)
        with pytest.raises(ValueError, match=r"R <= 16, got a of shape \(16, 40\)"):
            ops.shrink_expand_linear(x, w, None, a, b, 0.0, torch.tensor([1]))
        # R = 40 above the limit: the layer still runs, on two kernels.
        problem = make_problem((9,), 16, 12, (32, 8), torch.float32)
        check_backend_against_reference("triton", problem)
    with pytest.raises(ValueError, match="sets triton_forward='fast'"):
        mk.configure(triton_forward="fast")


def test_opcheck_schema_one_pass_forward():
    x, w, bias = torch.randn(40, 24), torch.randn(20, 24), torch.randn(20)
    a, b = torch.randn(24, 7), torch.randn(7, 20)
    args = (x, w, bias, a, b, 0.3, torch.tensor([5], dtype=torch.int64))
    torch.library.opcheck(torch.ops.msplora_triton.shrink_expand_linear, args, test_utils=("test_schema",))


def test_one_pass_forward_op_differentiates_on_its_own():
    # Its own autograd formula (for direct calls), against plain torch with the op's mask.
    torch.manual_seed(4)
    x, w, bias = torch.randn(33, 20), torch.randn(26, 20) / 5, torch.randn(26)
    a, b = torch.randn(20, 11) / 5, torch.randn(11, 26) * 0.3
    seed = torch.tensor([9], dtype=torch.int64)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias, a, b)]
    y, t = torch.ops.msplora_triton.shrink_expand_linear(*leaves, 0.2, seed)
    g_y, g_t = torch.randn_like(y), torch.randn_like(t)
    got = torch.autograd.grad((y * g_y).sum() + (t * g_t).sum(), leaves)
    mask = torch.ops.msplora_triton.dropout_mask(x, 0.2, seed)
    ref = [u.clone().requires_grad_(True) for u in (x, w, bias, a, b)]
    t_ref = (ref[0] * mask) @ ref[3]
    y_ref = ref[0] @ ref[1].T + ref[2] + t_ref @ ref[4]
    want = torch.autograd.grad((y_ref * g_y).sum() + (t_ref * g_t).sum(), ref)
    for name, g, h in zip(("x", "weight", "bias", "a", "b"), got, want):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-4, msg=name)


def test_autotuning_is_keyed_by_a_token_bucket_not_every_token_count(monkeypatch):
    # A new batch shape in the same power-of-two bucket gives the autotuner the same key, so it
    # reuses its choice instead of timing every configuration again.
    from msplora_kernels.triton_kernels import launchers

    keys = []

    class Recorder:  # stands in for wrap_triton: records the key the autotuner would see
        def __init__(self, tuner):
            assert tuner.keys == ["M_BUCKET", "N", "K", "R"]
            self.tuner = tuner

        def __getitem__(self, grid):
            names = self.tuner.fn.arg_names
            return lambda *args, **kwargs: keys.append(tuple(args[names.index(k)] for k in self.tuner.keys))

    monkeypatch.setattr(launchers, "wrap_triton", Recorder)
    w, bias, b = torch.randn(24, 40), torch.randn(24), torch.randn(6, 24)
    for m in (100, 120, 128, 129):
        launchers.expand_linear(torch.randn(m, 40), w, bias, torch.randn(m, 6), b)
    assert keys[0] == keys[1] == keys[2] == (128, 24, 40, 6) and keys[3] == (256, 24, 40, 6)


def test_alignment_is_judged_without_a_data_pointer():
    # The tile table's "aligned" key: widths and strides multiples of 16 and 16-byte-aligned
    # bases, judged from strides and storage offsets, so that fake tensors (torch.compile) work.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from msplora_kernels.triton_kernels.configs import is_aligned

    x = torch.empty(64, 96, dtype=torch.bfloat16)
    assert is_aligned((96,), (x,)) and not is_aligned((95,), (x,))
    assert not is_aligned((64,), (x[:, 1:65],))  # a 2-byte offset
    assert is_aligned((64,), (x[:, 8:72],)) and not is_aligned((96,), (torch.empty(64, 100)[:, :96],))
    with FakeTensorMode():
        fake = torch.empty(64, 96, dtype=torch.bfloat16)
        assert is_aligned((96,), (fake,)) and not is_aligned((64,), (fake[:, 1:65],))
