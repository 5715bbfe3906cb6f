"""The measured floor of one adapted layer: its GEMMs alone, on this machine's libraries.

An adapted layer's forward+backward must run the frozen layer's two GEMMs (y and dx) and the
adapter's six rank-R GEMMs (shrink, expand, dT, dB, dx's LoRA term, dA). This times exactly
those eight calls, with no dropout, copies or autograd, in interleaved rounds with the naive
form and the fused op, so that "x naive" goals can be checked against what the GEMMs allow.
The eight run twice: on torch's defaults, and each on whichever of ATen and oneDNN (in either
orientation) this machine runs fastest, as the cpp op chooses them (csrc/cpu/gemms.h); the floor
is the latter.

    python bench/gemm_floor.py                         # llama2-7b, the CPU token count
    python bench/gemm_floor.py --case roberta-base --repeats 15 --json floor.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402


def _onednn_mm(p, q):
    return torch.ops.mkldnn._linear_pointwise(p, q.t(), None, "none", [], None)


def _fastest(p, q):
    """p @ q on whichever of at::mm and oneDNN, plain or transposed, runs fastest here."""
    candidates = [lambda: torch.mm(p, q), lambda: torch.mm(q.t(), p.t())]
    if torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU"):
        candidates += [lambda: _onednn_mm(p, q), lambda: _onednn_mm(q.t(), p.t())]
    return min(candidates, key=lambda fn: timing.time_cpu_interleaved({0: fn}, 3)[0]["median"])


def gemm_calls(case, tokens: int, device):
    """(the frozen layer's two GEMMs, those plus the adapter's six, all on torch's defaults, and
    the eight each on the fastest library here), on fresh random operands."""
    K, N, R = case.in_features, case.out_features, sum(case.ranks)
    x, dy = torch.randn(tokens, K, device=device), torch.randn(tokens, N, device=device)
    w, bias = torch.randn(N, K, device=device) / K**0.5, torch.randn(N, device=device)
    a, b = torch.randn(K, R, device=device) / K**0.5, torch.randn(R, N, device=device) * 0.02
    t, dt = x @ a, dy @ b.t()
    # The eight: y, dx (frozen); shrink, expand, dT, dB, dx's LoRA term, dA (adapter).
    pairs = [(x, w.t()), (dy, w), (x, a), (t, b), (dy, b.t()), (t.t(), dy), (dt, a.t()), (x.t(), dt)]

    def frozen():
        torch.addmm(bias, x, w.t())
        dy.mm(w)

    def adapted():
        frozen()
        for p_, q_ in pairs[2:]:
            torch.mm(p_, q_)

    fastest = [_fastest(p_, q_) for p_, q_ in pairs]

    def adapted_fastest():
        for fn in fastest:
            fn()

    return frozen, adapted, adapted_fastest


def layer_step(layer, x, dy):
    def step():
        x.grad = None
        layer(x).backward(dy)

    return step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="llama2-7b", choices=sorted(methods.CASES))
    p.add_argument("--tokens", type=int, default=None, help="default: the case's CPU token count")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    case = methods.CASES[args.case]
    tokens = args.tokens or case.cpu_tokens
    torch.manual_seed(0)
    frozen, adapted, adapted_fastest = gemm_calls(case, tokens, "cpu")
    floor_name = "frozen + adapter GEMMs (fastest library each)"
    fns = {"frozen GEMMs (torch)": frozen, "frozen + adapter GEMMs (torch)": adapted, floor_name: adapted_fastest}
    x = torch.randn(tokens, case.in_features, requires_grad=True)
    dy = torch.randn(tokens, case.out_features)
    for dropout in (methods.PAPER_DROPOUT, 0.0):
        for method, backend in (("msplora_naive", None), ("msplora", "cpp")):
            layer = methods.build(method, backend, case, "cpu", torch.float32, dropout)
            fns[f"{method}[{backend or '-'}] dropout {dropout:g}"] = layer_step(layer, x, dy)
    res = timing.time_cpu_interleaved(fns, args.repeats)
    meta = report.metadata("cpu", torch.float32)
    floor = res[floor_name]["median"]
    print(f"{meta['device_name']}, {case.name} ({tokens} tokens), fwd+bwd ms, median of {args.repeats} rounds")
    for name, s in res.items():
        print(f"  {name:40s} {s['median']:8.2f}  (q20-q80 {s['q20']:.1f}-{s['q80']:.1f})")
    summary = {}
    for dropout in (methods.PAPER_DROPOUT, 0.0):
        naive = res[f"msplora_naive[-] dropout {dropout:g}"]["median"]
        fused = res[f"msplora[cpp] dropout {dropout:g}"]["median"]
        summary[f"{dropout:g}"] = {"gemm_floor_vs_naive": floor / naive, "cpp_vs_naive": fused / naive,
                                   "cpp_vs_gemm_floor": fused / floor}
        print(f"  dropout {dropout:g}: GEMM floor / naive {floor / naive:.3f}, cpp / naive {fused / naive:.3f}, "
              f"cpp / GEMM floor {fused / floor:.3f}")
    out = {"meta": meta, "case": case.name, "tokens": tokens, "timings": res, "floor": floor_name, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
