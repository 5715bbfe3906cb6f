"""Bad input: clear exceptions naming the argument and the shapes, never a crash."""
import pytest
import torch

import msplora_kernels as mk
from helpers import make_problem


def _problem():
    return make_problem((4,), 16, 12, (4, 2), torch.float32)


def test_wrong_last_dimension():
    x, w, b, As, Bs, s = _problem()
    with pytest.raises(ValueError, match=r"x has last dimension 15 \(shape \(4, 15\)\) but weight has shape \(12, 16\)"):
        mk.msplora_linear(torch.randn(4, 15), w, b, As, Bs, s)


def test_rank_mismatch_between_a_and_b():
    x, w, b, As, Bs, s = _problem()
    with pytest.raises(ValueError, match=r"rank mismatch at level 1: As\[1\] has shape \(16, 2\).*Bs\[1\] has shape \(3, 12\)"):
        mk.msplora_linear(x, w, b, As, [Bs[0], torch.randn(3, 12)], s)


def test_a_and_b_wrong_feature_sizes():
    x, w, b, As, Bs, s = _problem()
    with pytest.raises(ValueError, match=r"As\[0\] has shape \(15, 4\) but in_features is 16"):
        mk.msplora_linear(x, w, b, [torch.randn(15, 4), As[1]], Bs, s)
    with pytest.raises(ValueError, match=r"Bs\[1\] has shape \(2, 11\) but out_features is 12"):
        mk.msplora_linear(x, w, b, As, [Bs[0], torch.randn(2, 11)], s)


def test_lengths_differ():
    x, w, b, As, Bs, s = _problem()
    with pytest.raises(ValueError, match="same length, got 2, 1 and 2"):
        mk.msplora_linear(x, w, b, As, Bs[:1], s)
    with pytest.raises(ValueError, match="same length, got 2, 2 and 3"):
        mk.msplora_linear(x, w, b, As, Bs, s + [1.0])


@pytest.mark.parametrize("which", ["x", "weight", "As"])
def test_integer_dtypes(which):
    x, w, b, As, Bs, s = _problem()
    args = {"x": x, "weight": w, "As": As}
    if which == "As":
        args["As"] = [torch.ones(16, 4, dtype=torch.int64), As[1]]
    else:
        args[which] = torch.ones(args[which].shape, dtype=torch.int32)
    with pytest.raises(TypeError, match=rf"{which}.* must be floating point, got dtype torch.int"):
        mk.msplora_linear(args["x"], args["weight"], b, args["As"], Bs, s)


def test_device_mismatch():
    x, w, b, As, Bs, s = _problem()
    with pytest.raises(ValueError, match=r"As\[1\] is on meta but x is on cpu"):
        mk.msplora_linear(x, w, b, [As[0], torch.empty(16, 2, device="meta")], Bs, s)


def test_bad_bias_and_dropout():
    x, w, b, As, Bs, s = _problem()
    with pytest.raises(ValueError, match=r"bias has shape \(11,\)"):
        mk.msplora_linear(x, w, torch.randn(11), As, Bs, s)
    with pytest.raises(ValueError, match="dropout_p must be a float in"):
        mk.msplora_linear(x, w, b, As, Bs, s, dropout_p=1.0, training=True)


def test_direct_op_call_is_checked_in_cpp():
    # A direct torch.ops call bypasses the Python checks; C++ must still refuse.
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match=r"a.size\(0\) vs x.size\(1\)"):
        torch.ops.msplora.shrink(x, torch.randn(15, 3), 0.0, torch.empty(0, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.msplora.grad_a(torch.randn(2, 3, 4), torch.randn(2, 3), 0.0, torch.empty(0, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor of one element"):
        torch.ops.msplora.shrink(x, torch.randn(16, 3), 0.5, torch.empty(0, dtype=torch.int64))


def test_layer_config_errors():
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        mk.MSPLoraLinear(8, 8, ranks=(4, 0))
    with pytest.raises(ValueError, match="lora_alpha has 2 entries but there are 3 levels"):
        mk.MSPLoraLinear(8, 8, ranks=(4, 2, 1), lora_alpha=(16, 16))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        mk.MSPLoraLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
