"""A roofline cost model of the triton backend's launch plan on a GPU, with no GPU needed.

The plan is the real one: the launchers run in compile_check's recording mode, in the order the
autograd Function calls them (forward: shrink, expand_linear; backward: grad_t_b, grad_x,
grad_a; with dropout the shrink packs its mask and the backward reads it), and each recorded
launch (its kernel, tensors and tile) is costed:

    time = max(FLOPs / tensor-core rate, compulsory HBM bytes / bandwidth, mask hashes / integer rate)

Compulsory bytes count each operand once per pass the launch makes over it (the skinny kernels
pass over x or dy once per rank block); re-reads that hit L2 and atomics (which resolve in L2)
are not counted. Launch latency and wave tails are not counted either, so the times are lower
bounds, and the ratios are those of bounds. The frozen linear is costed the same way (cuBLAS
forward and input-gradient GEMMs).

    python bench/cost_model.py [--device h100 h200 a100] [--dropout 0.05] [--path fused cublas]
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods  # noqa: E402


@dataclass(frozen=True)
class Device:
    name: str
    arch: int
    tensor_tflops: float  # bf16/fp16 dense, what large cuBLAS GEMMs sustain (about 80% of the datasheet peak)
    hbm_tbs: float  # datasheet bandwidth
    int_tops: float  # 32-bit integer instructions a second: SMs x 64 lanes x boost clock


DEVICES = {
    # H100 SXM: 989 TFLOP/s bf16 peak, 132 SMs at 1.98 GHz. H200: the same chip with HBM3e.
    "h100": Device("H100 SXM", 90, 800.0, 3.35, 132 * 64 * 1.98e-3),
    "h200": Device("H200 SXM", 90, 800.0, 4.8, 132 * 64 * 1.98e-3),
    # A100 SXM 80 GB: 312 TFLOP/s peak, 108 SMs at 1.41 GHz.
    "a100": Device("A100 SXM", 80, 250.0, 2.04, 108 * 64 * 1.41e-3),
}
# Integer instructions per mask element: the splitmix64 finalizer on 32-bit lanes (64-bit
# multiplies and shifts take several each). Counted in sm_90 code: 488 SASS instructions the
# hash adds to shrink for 16 elements a thread, and 32-35 an element (NOTES.md).
HASH_INSTRUCTIONS = 33


@dataclass
class Cost:
    kernel: str
    flops: float
    hbm_bytes: float
    hashes: float  # mask elements hashed

    def seconds(self, dev: Device) -> float:
        return max(self.flops / (dev.tensor_tflops * 1e12), self.hbm_bytes / (dev.hbm_tbs * 1e12),
                   self.hashes * HASH_INSTRUCTIONS / (dev.int_tops * 1e12))

    def bound(self, dev: Device) -> str:
        terms = {"tensor cores": self.flops / dev.tensor_tflops, "HBM": self.hbm_bytes / dev.hbm_tbs,
                 "mask hash": self.hashes * HASH_INSTRUCTIONS / dev.int_tops}
        return max(terms, key=terms.get)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def launch_cost(kernel, args, kwargs) -> Cost:
    """FLOPs, compulsory HBM bytes and mask hashes of one recorded launch (see the module's doc)."""
    name = kernel if isinstance(kernel, str) else getattr(kernel, "fn", kernel).__name__.replace("_kernel", "")
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    dropout = kwargs.get("HAS_DROPOUT", False)
    # The packed mask: written by the shrink that draws it, read (not hashed) by the backward.
    bits = next((t for t in tensors if t.dtype == torch.int32), None)
    mask_bytes = _nbytes(bits) if bits is not None and (kwargs.get("KEEP_BITS") or kwargs.get("MASK_BITS")) else 0
    hashing = dropout and not kwargs.get("MASK_BITS", False)
    if name.startswith("cublas."):  # mm(a, b), addmm(bias, a, b), y.addmm_(a, b): read every operand, write the result
        a, b = args[-2], args[-1]
        out = a.shape[0] * b.shape[1] * a.element_size()
        return Cost(name, 2.0 * a.shape[0] * a.shape[1] * b.shape[1], sum(map(_nbytes, args)) + out, 0)
    r_pad = lambda r: math.ceil(r / kwargs["BLOCK_R"]) * kwargs["BLOCK_R"]  # noqa: E731
    passes = lambda r: math.ceil(r / kwargs["BLOCK_R"])  # noqa: E731
    if name == "shrink":
        x, a, t = tensors[:3]
        (m, k), r = x.shape, a.shape[1]
        return Cost(name, 2.0 * m * k * r_pad(r), _nbytes(x) * passes(r) + _nbytes(a) + _nbytes(t) + mask_bytes,
                    m * k * passes(r) if hashing else 0)
    if name == "expand_linear":
        x, w, _, t, b, y = tensors[:6]
        (m, k), n, r = x.shape, w.shape[0], b.shape[0]
        return Cost(name, 2.0 * m * n * (k + r_pad(r)), sum(map(_nbytes, (x, w, t, b, y))), 0)
    if name == "grad_t_b":
        dy, t, b, dt = tensors[:4]
        (m, n), r = dy.shape, b.shape[0]
        return Cost(name, 4.0 * m * n * r_pad(r), _nbytes(dy) * passes(r) + sum(map(_nbytes, (t, b, dt))) + 4 * r * n, 0)
    if name == "grad_x":
        dy, w, dt, a, dx = tensors[:5]
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner's kernel
        m, n_used, (k, r) = dx.shape[0], args[fn.arg_names.index("N")], a.shape
        accumulate = kwargs.get("ACCUMULATE", False)
        big = (dy, w) if n_used else ()
        return Cost(name, 2.0 * m * k * (n_used + r_pad(r)),
                    sum(map(_nbytes, (*big, dt, a))) + _nbytes(dx) * (2 if accumulate else 1) + mask_bytes,
                    m * k if hashing else 0)
    if name == "grad_a":
        x, dt = tensors[:2]
        (m, k), r = x.shape, dt.shape[1]
        return Cost(name, 2.0 * m * k * r_pad(r), _nbytes(x) * passes(r) + _nbytes(dt) + 4 * k * r + mask_bytes * passes(r),
                    m * k * passes(r) if hashing else 0)
    raise ValueError(f"cost_model: no cost for launch {name!r}")


def plan(case, tokens: int, dropout: float, path: str, arch: int, dtype=torch.bfloat16) -> list:
    """The recorded launches of one adapted layer's forward and backward, in the Function's order."""
    from msplora_kernels.triton_kernels import launchers
    from msplora_kernels.triton_kernels.compile_check import gemm_path, recording

    m, k, n, r = tokens, case.in_features, case.out_features, sum(case.ranks)
    g = {"dtype": dtype}
    x, w, bias = torch.empty(m, k, **g), torch.empty(n, k, **g), torch.empty(n, **g)
    a, b, dy = torch.empty(k, r, **g), torch.empty(r, n, **g), torch.empty(m, n, **g)
    seed = torch.zeros(1, dtype=torch.int64)
    with recording(arch) as calls, gemm_path(path):
        if dropout > 0:  # as the Function runs the triton backend (its keeps_mask_bits capability)
            t, bits = launchers.shrink_keep_mask(x, a, dropout, seed)
        else:
            t = launchers.shrink(x, a, dropout, seed)
        launchers.expand_linear(x, w, bias, t, b)
        dt, _ = launchers.grad_t_b(dy, t, b)
        if dropout > 0:
            launchers.grad_x_bits(dy, w, dt, a, bits, dropout)
            launchers.grad_a_bits(x, dt, bits, dropout)
        else:
            launchers.grad_x(dy, w, dt, a, dropout, seed)
            launchers.grad_a(x, dt, dropout, seed)
    return calls


def frozen_linear_costs(case, tokens: int, itemsize: int = 2) -> list[Cost]:
    """The frozen nn.Linear's forward (x W^T + b) and input gradient (dy W) on cuBLAS."""
    m, k, n = tokens, case.in_features, case.out_features
    io = (m * k + n * k + m * n) * itemsize
    return [Cost("linear forward", 2.0 * m * n * k, io + n * itemsize, 0), Cost("linear dx", 2.0 * m * n * k, io, 0)]


def predict(case, tokens: int, dropout: float, path: str, dev: Device) -> dict:
    costs = [launch_cost(*call) for call in plan(case, tokens, dropout, path, dev.arch)]
    adapted = sum(c.seconds(dev) for c in costs)
    frozen = sum(c.seconds(dev) for c in frozen_linear_costs(case, tokens))
    return {"case": case.name, "device": dev.name, "tokens": tokens, "dropout": dropout, "path": path,
            "predicted_us": round(adapted * 1e6, 1), "frozen_linear_us": round(frozen * 1e6, 1),
            "ratio": round(adapted / frozen, 3),
            "kernels": [{"kernel": c.kernel, "us": round(c.seconds(dev) * 1e6, 1), "bound": c.bound(dev),
                         "gflop": round(c.flops / 1e9, 2), "mb": round(c.hbm_bytes / 1e6, 1),
                         "mhashes": round(c.hashes / 1e6, 1)} for c in costs]}


def measured_device(device="cuda") -> Device:
    """This GPU's own ceilings: a large bf16 matmul's rate and a large copy's bandwidth, timed with
    do_bench; the integer rate from its SM count and clock (no benchmark isolates it)."""
    import triton.testing

    props = torch.cuda.get_device_properties(device)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ a, warmup=25, rep=200)
    src = torch.empty(1 << 30, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)
    clock_ghz = getattr(props, "clock_rate", 1_980_000) / 1e6  # kHz where torch reports it
    return Device(f"{props.name} (measured)", 10 * props.major + props.minor, 2 * 8192**3 / (mm_ms * 1e-3) / 1e12,
                  2 * src.numel() / (copy_ms * 1e-3) / 1e12, props.multi_processor_count * 64 * clock_ghz * 1e-3)


def table(predictions: list[dict]) -> str:
    rows = ["| case | device | dropout | path | predicted fwd+bwd µs | frozen linear µs | ratio | kernels (µs, bound) |",
            "|---|---|---|---|---|---|---|---|"]
    for p in predictions:
        kernels = ", ".join(f"{k['kernel']} {k['us']} ({k['bound']})" for k in p["kernels"])
        rows.append(f"| {p['case']} | {p['device']} | {p['dropout']} | {p['path']} | {p['predicted_us']} | "
                    f"{p['frozen_linear_us']} | {p['ratio']} | {kernels} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", nargs="+", default=list(DEVICES), choices=sorted(DEVICES))
    ap.add_argument("--cases", nargs="+", default=list(methods.DEFAULT_CASES), choices=sorted(methods.CASES))
    ap.add_argument("--dropout", nargs="+", type=float, default=[methods.PAPER_DROPOUT, 0.0])
    ap.add_argument("--path", nargs="+", default=["fused", "cublas"], choices=["fused", "cublas"])
    args = ap.parse_args(argv)
    out = [predict(methods.CASES[c], methods.CASES[c].gpu_tokens, p, path, DEVICES[d])
           for d in args.device for c in args.cases for p in args.dropout for path in args.path]
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
