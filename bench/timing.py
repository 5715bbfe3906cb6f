"""Timers: a wall clock after warm-up, in interleaved rounds, on the CPU; do_bench (or CUDA-graph replays) on a GPU."""
from __future__ import annotations

import random
import statistics
import time

import torch


def _summary(samples_ms):
    s = sorted(samples_ms)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {"median": statistics.median(s), "q20": q[1], "q80": q[7], "n": len(s)}


def time_cpu_interleaved(fns: dict, repeats: int, warmup: int = 2, tick=None, seed: int = 0) -> dict:
    """Times several callables in rounds, one call of each per round, in a new (seeded) random
    order each round, so that what falls between calls falls on all of them alike: drift in the
    machine's speed (other tenants, clocks), and the state the call before leaves. A step's
    frees can let glibc trim the heap, and the next step then pays page faults for its new
    tensors; in a fixed (rotated) order each method always followed the same neighbour, and the
    one after msplora_naive paid 1.5-2.5 ms more at roberta-base bf16 (bench/NOTES.md).
    Returns a summary per key; tick() after each round."""
    keys = list(fns)
    rng = random.Random(seed)
    for _ in range(warmup):
        for k in keys:
            fns[k]()
    samples = {k: [] for k in keys}
    for _ in range(repeats):
        order = keys[:]
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append((time.perf_counter() - t0) * 1e3)
        if tick:
            tick()
    return {k: _summary(v) for k, v in samples.items()}


def time_cuda(fn, rep_ms: int = 200, cuda_graphs: bool = False):
    import triton.testing

    if cuda_graphs:
        med, q20, q80 = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    else:
        med, q20, q80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return {"median": med, "q20": q20, "q80": q80, "n": None}


def peak_memory_mb(fn, device) -> float | None:
    """Extra memory one call allocates at its peak, above what was allocated before it."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def record_fields(fwd: dict, fwd_bwd: dict, tokens: int) -> dict:
    """A record's timing fields from the summaries of the forward and of forward+backward (or a step)."""
    return {
        "fwd_ms": fwd["median"], "fwd_q20_ms": fwd["q20"], "fwd_q80_ms": fwd["q80"],
        "fwd_bwd_ms": fwd_bwd["median"], "fwd_bwd_q20_ms": fwd_bwd["q20"], "fwd_bwd_q80_ms": fwd_bwd["q80"],
        "repeats": fwd_bwd["n"], "tokens_per_s": tokens / (fwd_bwd["median"] / 1e3),
    }
