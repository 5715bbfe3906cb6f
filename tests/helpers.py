"""Shared test helpers: random MSPLoRA problems, the reference run, and per-dtype comparisons."""
from __future__ import annotations

import torch

from msplora_kernels import msplora_linear, msplora_linear_reference
from msplora_kernels.ops.backends import BACKENDS
from msplora_kernels.ops.cpu_info import cpu_info
from msplora_kernels.ops.functional import draw_seed

# Where the cpp backend's thin bf16 kernels (csrc/cpu/thin_product.h) can run.
HAS_BF16_DOT = "avx512_bf16" in cpu_info()["isa"]

# Absolute floors for exact-ish dtypes; low-precision dtypes are judged against the
# reference's own error in that dtype (see assert_close_to_truth).
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def precise_dtype(backend: str) -> torch.dtype:
    """The most precise dtype a backend computes in: float64, or float32 for triton."""
    return torch.float32 if backend == "triton" else torch.float64


def make_problem(lead, in_f, out_f, ranks, dtype, *, bias=True, train_base=False, device="cpu", noncontig=False,
                 weight_in_out=False):
    """Random x, weight, bias, As, Bs (B non-zero, so every path is exercised), and scales.
    weight_in_out: the weight is the transposed view of an (in, out) tensor, as a Conv1D gives it."""
    g = {"device": device, "dtype": dtype}
    if noncontig:
        # A transposed view: same values, strides that are not row-major.
        x = torch.randn(*lead[:-1], in_f, lead[-1], **g).transpose(-1, -2) if lead else torch.randn(in_f, **g)
    else:
        x = torch.randn(*lead, in_f, **g)
    x.requires_grad_(True)
    weight = torch.randn(in_f, out_f, **g).t() if weight_in_out else torch.randn(out_f, in_f, **g)
    weight = (weight / in_f**0.5).requires_grad_(train_base)
    b = (torch.randn(out_f, **g) * 0.1).requires_grad_(train_base) if bias else None
    As = [(torch.randn(in_f, r, **g) / in_f**0.5).requires_grad_(True) for r in ranks]
    Bs = [(torch.randn(r, out_f, **g) * 0.2).requires_grad_(True) for r in ranks]
    scales = [16.0 / r for r in ranks]
    return x, weight, b, As, Bs, scales


def leaves(x, weight, bias, As, Bs):
    out = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    out += [(f"As[{i}]", a) for i, a in enumerate(As)] + [(f"Bs[{i}]", b) for i, b in enumerate(Bs)]
    return [(n, t) for n, t in out if t.requires_grad]


def detached_copy(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        c = t.detach().to(dtype or t.dtype).clone()
        out.append(c.requires_grad_(t.requires_grad))
    return out


def drawn_seed(x: torch.Tensor, rng_seed: int) -> torch.Tensor:
    """The dropout seed msplora_linear draws for x after torch.manual_seed(rng_seed)."""
    torch.manual_seed(rng_seed)
    return draw_seed(x.device)


def backend_mask(backend: str, x: torch.Tensor, p: float, rng_seed: int) -> torch.Tensor:
    """The dropout mask `backend`'s own op draws after torch.manual_seed(rng_seed), shaped like x."""
    seed = drawn_seed(x, rng_seed)
    x2d = x.detach().reshape(-1, x.shape[-1]).contiguous()
    return BACKENDS[backend].ops.dropout_mask(x2d, p, seed).reshape(x.shape)


def run(fn_backend, problem, grad_out, *, dropout_p=0.0, training=False, seed=None, rng_seed=0):
    """Forward and backward; returns (y, {name: grad}). The reference takes the dropout seed itself."""
    x, weight, bias, As, Bs, scales = problem
    if fn_backend == "reference":
        y = msplora_linear_reference(x, weight, bias, As, Bs, scales, dropout_p if seed is not None else 0.0, seed)
    else:
        torch.manual_seed(rng_seed)
        y = msplora_linear(x, weight, bias, As, Bs, scales, dropout_p=dropout_p, training=training, backend=fn_backend)
    names, ts = zip(*leaves(x, weight, bias, As, Bs))
    grads = torch.autograd.grad(y, ts, grad_out.to(y.dtype), allow_unused=False) if y.numel() else [torch.zeros_like(t) for t in ts]
    return y.detach(), dict(zip(names, [g.detach() for g in grads]))


def describe_mismatch(name, got, want, tol):
    diff = (got.double() - want.double()).abs()
    idx = torch.nonzero(diff > tol)[:5]
    rows = [f"  at {tuple(i.tolist())}: got {got[tuple(i)].item():.6g}, want {want[tuple(i)].item():.6g}" for i in idx]
    return f"{name}: max abs err {diff.max().item():.3g} > tol {tol:.3g}\n" + "\n".join(rows)


def assert_close_to_truth(name, got, truth, same_precision_ref, dtype):
    """got may be at most 2x as far from the float64 truth as the reference computed in
    `dtype` is (flash-attention's rule), plus a small floor."""
    if got.numel() == 0:
        assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
        return
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    ref_err = (same_precision_ref.double() - truth.double()).abs().max().item()
    scale = truth.double().abs().max().item() + 1.0
    tol = 2.0 * ref_err + FLOOR[dtype] * scale
    err = (got.double() - truth.double()).abs().max().item()
    assert err <= tol, describe_mismatch(name, got, truth.to(got.dtype), tol)


def check_backend_against_reference(backend, problem, *, dropout_p=0.0, training=False, rng_seed=1234):
    """Run `backend` and the reference (float64 truth and same dtype) on the same inputs and
    grad_output; with dropout, the reference draws its mask from the seed the backend's call drew."""
    x = problem[0]
    dtype = x.dtype
    out_f = problem[1].shape[0]
    grad_out = torch.randn(*x.shape[:-1], out_f, dtype=torch.float64, device=x.device)
    seed = drawn_seed(x, rng_seed) if training and dropout_p > 0 else None
    y, grads = run(backend, problem, grad_out, dropout_p=dropout_p, training=training, rng_seed=rng_seed)
    truth_problem = detached_copy(problem[:2], torch.float64) + [detached_copy([problem[2]], torch.float64)[0]]
    truth_problem += [detached_copy(problem[3], torch.float64), detached_copy(problem[4], torch.float64), problem[5]]
    same_problem = detached_copy(problem[:3]) + [detached_copy(problem[3]), detached_copy(problem[4]), problem[5]]
    y64, g64 = run("reference", truth_problem, grad_out, dropout_p=dropout_p, seed=seed)
    y_lp, g_lp = run("reference", same_problem, grad_out, dropout_p=dropout_p, seed=seed)
    assert y.dtype == dtype, f"output dtype {y.dtype} != input dtype {dtype}"
    assert_close_to_truth("y", y, y64, y_lp, dtype)
    assert set(grads) == set(g64), f"gradients for {sorted(grads)} but expected {sorted(g64)}"
    for name in grads:
        assert grads[name].dtype == dtype, f"{name}.grad dtype {grads[name].dtype}"
        assert_close_to_truth(f"grad {name}", grads[name], g64[name], g_lp[name], dtype)
    return y, grads
