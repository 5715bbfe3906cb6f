"""Where a training step of one layer spends its time, op by op: torch.profiler's self CPU time per
step of a frozen linear and of msplora on a backend, for the cells of bench/throughput.py.

    python bench/profile_ops.py                                   # roberta-base and llama2-7b, bf16, p 0.05 and 0
    python bench/profile_ops.py --cases llama2-7b --dtypes float32 --dropouts 0 --out profile.txt

Self time per step is each op's own time (its children's excluded) over the profiled steps; the
table lists the ops that take the most of it. Profiling adds its own cost per op call, so read the
shares, and take step times from bench/throughput.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods  # noqa: E402


def step_fn(layer, x, dy):
    trained = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for p in trained:
            p.grad = None
        x.grad = None
        layer(x).backward(dy)

    return step


def table(method: str, backend, case, dtype, dropout: float, steps: int, rows: int) -> str:
    torch.manual_seed(0)
    x = torch.randn(case.cpu_tokens, case.in_features, dtype=dtype, requires_grad=True)
    dy = torch.randn(case.cpu_tokens, case.out_features, dtype=dtype)
    step = step_fn(methods.build(method, backend, case, "cpu", dtype, dropout), x, dy)
    for _ in range(5):  # warm-up: the cpp backend's GEMM choices, oneDNN's primitives
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    label = method + (f"[{backend}]" if backend else "")
    lines = [f"=== {case.name} {str(dtype).removeprefix('torch.')} p={dropout} {label}: {total:.2f} ms self CPU a step "
             f"({steps} steps, {case.cpu_tokens} tokens)",
             f"{'op':<45} {'ms a step':>10} {'calls a step':>13} {'share':>6}"]
    for e in events[:rows]:
        ms = e.self_cpu_time_total / steps / 1e3
        lines.append(f"{e.key[:45]:<45} {ms:>10.3f} {e.count / steps:>13.1f} {ms / total:>6.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(methods.DEFAULT_CASES), choices=list(methods.CASES))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--dropouts", nargs="+", type=float, default=[methods.PAPER_DROPOUT, 0.0])
    p.add_argument("--methods", nargs="+", default=["linear_onednn", "msplora"],
                   help="methods of bench/methods.py; msplora runs on the cpp backend")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--out", help="also write the tables to this file")
    args = p.parse_args(argv)
    methods.quiet_bitsandbytes_import()
    tables = []
    for dtype in args.dtypes:
        for dropout in args.dropouts:
            for name in args.cases:
                for method in args.methods:
                    backend = "cpp" if method == "msplora" else None
                    tables.append(table(method, backend, methods.CASES[name], getattr(torch, dtype), dropout,
                                        args.steps, args.rows))
                    print(tables[-1] + "\n", flush=True)
    if "msplora" in args.methods and hasattr(torch.ops.msplora, "gemm_choices"):
        tables.append("cpp GEMM choices:\n" + torch.ops.msplora.gemm_choices())
        print(tables[-1])
    if args.out:
        Path(args.out).write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
