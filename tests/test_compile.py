"""torch.compile(fullgraph=True) traces our ops and matches eager, forward and gradients."""
import pytest
import torch
from torch import nn

import msplora_kernels as mk


class TwoLayer(nn.Module):
    def __init__(self, backend, device="cpu", dropout=0.0):
        super().__init__()
        shared = mk.LoraLevel(32, 32, rank=8, device=device)
        self.shared = shared
        kwargs = dict(ranks=(8, 4, 2), levels=[shared, None, None], dropout=dropout, backend=backend, device=device)
        self.l1 = mk.MSPLoraLinear(32, 32, **kwargs)
        self.l2 = mk.MSPLoraLinear(32, 32, **kwargs)
        for lvl in (shared, *self.l1.own_levels.values(), *self.l2.own_levels.values()):
            nn.init.normal_(lvl.B, std=0.1)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


def _grads(fn, model, x):
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout seed for eager and compiled (with inductor's fallback_random)
    y = fn(x)
    y.square().mean().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def compile_matches_eager(backend, device, dropout=0.0):
    torch._dynamo.reset()
    model = TwoLayer(backend, device, dropout)
    x = torch.randn(4, 9, 32, device=device)
    y_eager, g_eager = _grads(model, model, x)
    compiled = torch.compile(model, fullgraph=True)
    # Inductor draws random numbers its own way; fallback_random makes it draw the seed as eager does.
    with torch._inductor.config.patch(fallback_random=True):
        y_comp, g_comp = _grads(compiled, model, x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-5)
    assert g_comp.keys() == g_eager.keys() and len(g_comp) == 10
    for name in g_eager:
        torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compile_cpu_cpp_backend(dropout):
    # With dropout, forward and backward must use one mask under compile too.
    compile_matches_eager("cpp", "cpu", dropout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in mk.available_backends("cuda")])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_compile_cuda_backends(backend, dropout):
    compile_matches_eager(backend, "cuda", dropout)
