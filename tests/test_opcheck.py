"""torch.library.opcheck on every compiled op: schema, fake tensor, autograd registration, AOT dispatch."""
import pytest
import torch

import msplora_kernels  # noqa: F401  (loads the ops)


def op_cases(ns, device="cpu", dtype=torch.float64):
    g = {"device": device, "dtype": dtype}
    x = torch.randn(37, 24, **g, requires_grad=True)
    a = torch.randn(24, 7, **g, requires_grad=True)
    w = torch.randn(20, 24, **g, requires_grad=True)
    bias = torch.randn(20, **g, requires_grad=True)
    b = torch.randn(7, 20, **g, requires_grad=True)
    t = torch.randn(37, 7, **g, requires_grad=True)
    dy = torch.randn(37, 20, **g, requires_grad=True)
    dt = torch.randn(37, 7, **g, requires_grad=True)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    none = torch.empty(0, dtype=torch.int64, device=device)
    return {
        "shrink": [(x, a, 0.0, none), (x, a, 0.25, seed)],
        "expand_linear": [(x, w, bias, t, b), (x, w, None, t, b)],
        "grad_t_b": [(dy, t, b)],
        "grad_x": [(dy, w, dt, a, 0.0, none), (dy, w, dt, a, 0.25, seed)],
        "grad_a": [(x, dt, 0.0, none), (x, dt, 0.25, seed)],
        "dropout_mask": [(x.detach(), 0.25, seed)],
        "dropout": [(x, 0.0, none), (x, 0.25, seed)],
    }


@pytest.mark.parametrize("name", ["shrink", "expand_linear", "grad_t_b", "grad_x", "grad_a", "dropout_mask", "dropout"])
def test_opcheck_cpu(name):
    op = getattr(torch.ops.msplora, name)
    for args in op_cases("msplora")[name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["shrink", "expand_linear", "grad_t_b", "grad_x", "grad_a", "dropout"])
def test_primitive_op_gradients_are_right(name):
    # The per-op autograd formulas, checked numerically in float64.
    op = getattr(torch.ops.msplora, name)
    for args in op_cases("msplora")[name]:
        tensors = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor) and v.requires_grad]

        def f(*ts, args=args, tensors=tensors):
            full = list(args)
            for i, t in zip(tensors, ts):
                full[i] = t
            return op(*full)

        assert torch.autograd.gradcheck(f, [args[i] for i in tensors], eps=1e-6, atol=1e-6)
