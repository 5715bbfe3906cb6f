"""Compile every Triton launch the launchers make, as a real launch compiles it, without a GPU.

    python -m msplora_kernels.triton_kernels.compile_check                  # sm_90 and sm_80, all dtypes
    python -m msplora_kernels.triton_kernels.compile_check --arch 90 --dtypes bf16 --json out.json

The launchers run in a recording mode: each `wrap_triton(kernel)[grid](*args, **kwargs)` they
would launch is captured with its real arguments (CPU tensors of real shapes), once per
configuration the autotuner may pick. Each capture is specialized by Triton's own JIT binder, the
code a launch runs (create_function_from_signature and JITFunction._pack_args): a stride of 1
becomes a constant, and pointers, sizes and strides divisible by 16 get that hint, which turns loads
into cp.async pipelines. The result is compiled for the target, and each record holds its shared
memory, registers and spills (ptxas -v), the tensor-core instructions in its code (wgmma on sm_90,
mma on sm_80) and its memory fences. The exit status is 1 when a configuration the launchers may
pick does not fit, spills, fails to compile, or (on sm_90) lowers a tensor-core dot without them.
Run it without TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from .configs import SHARED_LIMIT

DTYPES = ("bf16", "fp16", "fp32")
# (label, tokens, in_features, out_features, ranks): the bench's default GPU cases (roberta-base's
# token count made ragged, as packed batches are), and sizes that divide by no power of two above
# 1, which turn every divisibility hint off, at both rank classes. Together they cover every key
# of the tile table (configs.py).
SHAPES = (("roberta-base", 8190, 768, 768, (8, 4, 2)), ("llama2-7b", 8192, 4096, 4096, (64, 32, 16)),
          ("odd", 777, 1001, 333, (7, 5, 3, 1)), ("odd-large-rank", 777, 1001, 333, (64, 32, 16)))


@contextlib.contextmanager
def recording(arch: int):
    """Within the block the launchers record their launches in the yielded list, launching nothing,
    and pick their tiles for `arch`."""
    from . import launchers

    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    def cublas(name):
        # The cuBLAS path's GEMMs: recorded as ("cublas.<name>", args, {}), not computed.
        def gemm(*args):
            calls.append((f"cublas.{name}", args, {}))
            return args[0] if name == "addmm_" else torch.empty(args[-2].shape[0], args[-1].shape[1],
                                                                 dtype=args[-1].dtype)
        return gemm

    import torch

    names = ("wrap_triton", "target_arch", "frozen_mm", "frozen_addmm", "accumulate_mm")
    original = {n: getattr(launchers, n) for n in names}
    stand_ins = (Recorder, lambda device: arch, cublas("mm"), cublas("addmm"), cublas("addmm_"))
    for n, stand_in in zip(names, stand_ins):
        setattr(launchers, n, stand_in)
    try:
        yield calls
    finally:
        for n, fn in original.items():
            setattr(launchers, n, fn)


@contextlib.contextmanager
def gemm_path(path: str):
    """Within the block the launchers take this frozen-GEMM path (gemm_paths.py)."""
    from . import gemm_paths

    previous, gemm_paths.MODE = gemm_paths.MODE, path
    try:
        yield
    finally:
        gemm_paths.MODE = previous


def recorded_launches(dtype: str, shape, arch: int, tf32: bool = False) -> list:
    """(kernel, args, kwargs) of every launch of one layer's forward and backward at `shape`, with
    dropout and without; kernel may be an autotuner."""
    import torch

    from . import launchers

    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    _, m, k, n, ranks = shape
    r = sum(ranks)
    g = {"dtype": tdtype}
    x, w, bias = torch.empty(m, k, **g), torch.empty(n, k, **g), torch.empty(n, **g)
    a, b, t = torch.empty(k, r, **g), torch.empty(r, n, **g), torch.empty(m, r, **g)
    dy, dt = torch.empty(m, n, **g), torch.empty(m, r, **g)
    seed = torch.zeros(1, dtype=torch.int64)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with recording(arch) as calls:
            bits = torch.zeros(m, -(-k // 32), dtype=torch.int32)
            for p in (0.0, 0.1):
                launchers.shrink(x, a, p, seed)
                for path in ("fused", "cublas"):
                    with gemm_path(path):
                        launchers.grad_x(dy, w, dt, a, p, seed)
                        if p > 0:  # the forward's packed mask instead of the hash
                            launchers.grad_x_bits(dy, w, dt, a, bits, p)
                launchers.grad_a(x, dt, p, seed)
                if p > 0:
                    launchers.shrink_keep_mask(x, a, p, seed)
                    launchers.grad_a_bits(x, dt, bits, p)
                if r <= launchers.ONE_PASS_MAX_RANK:
                    launchers.shrink_expand_linear(x, w, bias, a, b, p, seed)
            for path in ("fused", "cublas"):
                with gemm_path(path):
                    launchers.expand_linear(x, w, bias, t, b)
            launchers.grad_t_b(dy, t, b)
            launchers.dropout_mask(x, 0.1, seed)
            launchers.dropout(x, 0.1, seed)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return calls


def specialized(fn, args, kwargs, arch: int):
    """What a launch of `fn` with these arguments compiles: Triton's own binder and packing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def configurations(kernel, kwargs):
    """(fn, kwargs) for each configuration the launch may run: every one an autotuner may pick."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return [(kernel, kwargs)]
    return [(kernel.fn, {**kwargs, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}) for c in configs]


def _ptxas() -> str | None:
    """The newest ptxas Triton ships (its PTX may be too new for the older one), else None."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.isfile(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    return None


def ptxas_version() -> str | None:
    ptxas = _ptxas()
    if ptxas is None:
        return None
    return subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]


def register_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread, from ptxas -v on the kernel's PTX (the compiled kernel
    reports them only once loaded on a GPU). Empty if ptxas is missing or rejects the PTX."""
    ptxas = _ptxas()
    if ptxas is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", src,
                               "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores", proc.stderr)
    if proc.returncode != 0 or regs is None:
        return {}
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)) if spills else 0}


def instruction_counts(ptx: str) -> dict:
    """Tensor-core instructions (wgmma, mma) and fences in the PTX: memory-ordering ones (membar,
    fence.sc, fence.acq_rel: what an acquire-release atomic brings) apart from the proxy fences
    that order shared-memory writes before a wgmma reads them."""
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)), "mma": len(re.findall(r"\bmma\.sync", ptx)),
            "fences": len(re.findall(r"\b(membar\.|fence\.(sc|acq_rel))", ptx)),
            "proxy_fences": len(re.findall(r"\bfence\.proxy", ptx))}


def uses_dot(fn) -> bool:
    return "tl.dot(" in fn.src


def expects_tensor_cores(constexprs: dict, signature: dict) -> bool:
    """A dot in fp16/bf16, or fp32 under TF32, should run on tensor cores; IEEE fp32 cannot."""
    dtypes = {v for v in signature.values() if isinstance(v, str) and v.startswith("*fp")}  # seeds, masks: ints
    return not (dtypes == {"*fp32"} and "ieee" in constexprs.values())


def compile_record(fn, args, kwargs, arch: int, registers: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialized(fn, args, kwargs, arch)
    src = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    ptx = compiled.asm["ptx"]
    named = dict(zip(fn.arg_names, range(len(fn.arg_names))))
    rec = {
        "shared_bytes": compiled.metadata.shared,
        # Arguments the launch turned into constants (a stride of 1), beside the declared constexprs.
        "constant_args": sorted(n for n, i in named.items() if (i,) in constexprs and not fn.params[i].is_constexpr),
        "divisible_by_16": sorted(n for n, i in named.items() if ["tt.divisibility", 16] in attrs.get((i,), [])),
        **instruction_counts(ptx),
        "tensor_cores_expected": uses_dot(fn) and expects_tensor_cores(constexprs, signature),
    }
    if registers:
        rec.update(register_report(ptx, arch))
    return rec


def _key(fn, args, kwargs, arch):
    signature, constexprs, attrs, options = specialized(fn, args, kwargs, arch)
    return fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())), repr(sorted(attrs.items())), \
        repr(sorted(options.__dict__.items()))


def launch_plan(dtypes, arch: int) -> list[tuple]:
    """(dtype, shape label, fn, args, kwargs) of every distinct compile the launchers ask for."""
    plan, seen = [], set()
    for dtype in dtypes:
        for shape in SHAPES:
            for tf32 in ([False, True] if dtype == "fp32" else [False]):
                for kernel, args, kwargs in recorded_launches(dtype, shape, arch, tf32):
                    if isinstance(kernel, str):  # a cuBLAS call of the cuBLAS path: nothing of ours
                        continue
                    for fn, kw in configurations(kernel, kwargs):
                        key = _key(fn, args, kw, arch)
                        if key not in seen:
                            seen.add(key)
                            plan.append((dtype, shape[0], fn, args, kw))
    return plan


def run(dtypes, arch: int, progress=True, registers=True, kernels=None) -> tuple[list[dict], list[str]]:
    """Compile every distinct launch; returns the records and the problems found."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check: unset TRITON_INTERPRET; the interpreter does not compile kernels")
    from tqdm import tqdm

    limit = SHARED_LIMIT.get(arch, 99 * 1024)  # from configs
    records, problems = [], []
    plan = [launch for launch in launch_plan(dtypes, arch)
            if kernels is None or launch[2].__name__.replace("_kernel", "") in kernels]
    for dtype, shape, fn, args, kw in tqdm(plan, desc=f"compile sm_{arch}", unit="launch", disable=not progress,
                                           file=sys.stderr):
        config = {k: v for k, v in kw.items() if k.startswith("BLOCK") or k in ("GROUP_M", "num_warps", "num_stages",
                                                                                  "HAS_DROPOUT", "DOT_PRECISION", "ACCUMULATE",
                                                                                  "KEEP_BITS", "MASK_BITS")}
        rec = {"kernel": fn.__name__.replace("_kernel", ""), "dtype": dtype, "shape": shape, "arch": arch, **config}
        t0 = time.perf_counter()
        try:
            rec.update(compile_record(fn, args, kw, arch, registers))
            rec["fits"] = rec["shared_bytes"] <= limit
        except Exception as exc:  # a kernel that does not compile is the finding
            rec.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", fits=False)
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        problems += record_problems(rec, limit)
    return records, problems


def record_problems(rec: dict, limit: int) -> list[str]:
    where = f"sm_{rec['arch']} {rec['dtype']} {rec['shape']} {rec['kernel']} " + \
        " ".join(f"{k}={v}" for k, v in rec.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages"))
    if "error" in rec:
        return [f"{where}: does not compile: {rec['error']}"]
    out = []
    if not rec["fits"]:
        out.append(f"{where}: needs {rec['shared_bytes']} bytes of shared memory, over {limit}")
    if rec.get("spill_store_bytes"):
        out.append(f"{where}: spills {rec['spill_store_bytes']} bytes per thread")
    if rec["arch"] >= 90 and rec["tensor_cores_expected"] and not rec["wgmma"]:
        out.append(f"{where}: its dot runs without wgmma")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities x10 (90: H100/H200)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--json", default=None, help="write every launch's record here")
    ap.add_argument("--no-registers", action="store_true", help="skip ptxas -v (registers and spills)")
    ap.add_argument("--kernels", nargs="+", default=None, help="only these kernels (default: all)")
    args = ap.parse_args(argv)
    records, problems = [], []
    for arch in args.arch:
        r, p = run(args.dtypes, arch, registers=not args.no_registers, kernels=args.kernels)
        records += r
        problems += p
    for r in records:
        size = f"{r['shared_bytes'] / 1024:6.1f} KiB" if "shared_bytes" in r else "   error"
        tile = "x".join(str(r[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R") if k in r)
        regs = f" {r['registers']:3} regs {r['spill_store_bytes']:5} B spilled" if "registers" in r else ""
        tc = f" wgmma {r['wgmma']:3} mma {r['mma']:3} fences {r['fences']}" if "wgmma" in r else ""
        print(f"sm_{r['arch']} {r['dtype']:4} {r['shape']:12} {r['kernel']:20} {tile:15} w{r.get('num_warps')} "
              f"s{r.get('num_stages')} {size}{regs}{tc}")
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"archs": args.arch, "triton": triton.__version__, "ptxas": ptxas_version(),
                       "records": records, "problems": problems}, f, indent=1)
    for p in problems:
        print("PROBLEM:", p)
    print(f"{len(records)} launches compiled, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
