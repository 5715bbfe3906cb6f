"""Non-finite inputs propagate as they would through nn.Linear: never silently zeroed."""
import pytest
import torch

import msplora_kernels as mk
from helpers import make_problem, precise_dtype


@pytest.mark.parametrize("backend", mk.available_backends("cpu"))
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_nan_and_inf_propagate_like_the_reference(backend, p):
    x, w, b, As, Bs, s = make_problem((6,), 16, 12, (4, 2), precise_dtype(backend))
    x = x.detach().clone()
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[2, 0] = float("-inf")
    torch.manual_seed(1)
    y = mk.msplora_linear(x, w, b, As, Bs, s, dropout_p=p, training=p > 0, backend=backend)
    linear = torch.nn.functional.linear(x, w, b)
    # Rows with a non-finite input are non-finite wherever nn.Linear's are; finite rows stay finite.
    assert torch.equal(torch.isfinite(y).all(1), torch.isfinite(linear).all(1))
    assert not torch.isfinite(y[:3]).all(1).any() and torch.isfinite(y[3:]).all()
    assert torch.isnan(y[0]).all()
