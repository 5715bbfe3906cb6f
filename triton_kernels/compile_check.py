"""Compile the Triton kernels for a GPU without one: every launch configuration the launchers can
pick, for each dtype, down to a cubin, with the shared memory each needs.

    python -m msplora_kernels.triton_kernels.compile_check            # sm_90 (H100/H200), all dtypes
    python -m msplora_kernels.triton_kernels.compile_check --dtypes bf16 --json out.json

A configuration that needs more shared memory than the chip has would fail at launch; the autotuned
GEMMs may skip some, but every kernel and dtype must keep at least one that fits. The exit status
is 1 when one does not, or when a configuration fails to compile. Run it without
TRITON_INTERPRET=1 (the interpreter replaces the kernels by Python functions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory one block may use (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = ("bf16", "fp16", "fp32")
# Pointer arguments that are fp32 accumulators whatever the inputs' dtype.
FP32_POINTERS = {"db_ptr", "da_ptr"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "seed_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        elif name in ("p", "keep_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # sizes and strides; the launchers pass Python ints
    return sig


def launch_variants(dtype: str):
    """(kernel name, fn, constexprs, num_warps, num_stages, group) of every configuration to check.
    group names the set of which at least one must fit: a kernel's autotune space, or one fixed config."""
    import torch

    from . import configs, kernels

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    precisions = ["ieee", "tf32"] if dtype == "fp32" else ["ieee"]
    block_m, block_wide, warps, stages = configs.skinny_tiles(torch_dtype)
    # R = 14 (8/4/2) and R = 112 (64/32/16), the paper's pyramids, give the two rank blocks.
    rank_blocks = sorted({configs.rank_block(14, torch_dtype), configs.rank_block(112, torch_dtype)})
    out = []
    for prec in precisions:
        for cfg in configs.gemm_configs(torch_dtype):
            kw = cfg.kwargs
            for name, fn, flags in (("expand_linear", kernels.expand_linear_kernel, {"HAS_BIAS": True}),
                                    ("grad_x", kernels.grad_x_kernel, {"HAS_DROPOUT": True})):
                for block_r in rank_blocks:
                    const = {**flags, **kw, "BLOCK_R": block_r, "DOT_PRECISION": prec}
                    out.append((name, fn, const, cfg.num_warps, cfg.num_stages, f"{name}/{prec}/R{block_r}"))
            # The one-pass forward at its largest rank block, the one that needs the most memory.
            const = {"HAS_BIAS": True, "HAS_DROPOUT": True, **kw, "BLOCK_R": configs.ONE_PASS_MAX_RANK,
                     "DOT_PRECISION": prec}
            out.append(("shrink_expand_linear", kernels.shrink_expand_linear_kernel, const, cfg.num_warps,
                        cfg.num_stages, f"shrink_expand_linear/{prec}/R{configs.ONE_PASS_MAX_RANK}"))
        for block_r in rank_blocks:
            for dropout in (False, True):
                for name, fn in (("shrink", kernels.shrink_kernel), ("grad_a", kernels.grad_a_kernel)):
                    const = {"HAS_DROPOUT": dropout, "BLOCK_M": block_m, "BLOCK_K": block_wide, "BLOCK_R": block_r,
                             "DOT_PRECISION": prec}
                    out.append((name, fn, const, warps, stages, f"{name}/{prec}/R{block_r}/p{int(dropout)}"))
            const = {"BLOCK_M": block_m, "BLOCK_N": block_wide, "BLOCK_R": block_r, "DOT_PRECISION": prec}
            out.append(("grad_t_b", kernels.grad_t_b_kernel, const, warps, stages, f"grad_t_b/{prec}/R{block_r}"))
    out.append(("dropout_mask", kernels.dropout_mask_kernel, {"BLOCK_M": 32, "BLOCK_K": 32}, 4, 1, "dropout_mask"))
    return out


def compile_one(fn, dtype, const, warps, stages, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, dtype, const),
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def _ptxas() -> str | None:
    """The newest ptxas Triton ships (its PTX may be too new for the older one), else None."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.isfile(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    return None


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


def run(dtypes, arch: int, progress=True, registers=False) -> tuple[list[dict], list[str]]:
    """Compile every variant; returns the records and the problems found."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check: unset TRITON_INTERPRET; the interpreter does not compile kernels")
    from tqdm import tqdm

    limit = SHARED_LIMIT.get(arch, 99 * 1024)
    jobs = [(dtype, *v) for dtype in dtypes for v in launch_variants(dtype)]
    records, problems, fits = [], [], {}
    for dtype, name, fn, const, warps, stages, group in tqdm(jobs, desc=f"compile sm_{arch}", unit="kernel",
                                                           disable=not progress, file=sys.stderr):
        rec = {"kernel": name, "dtype": dtype, "group": group, "num_warps": warps, "num_stages": stages,
               **{k: v for k, v in const.items()}}
        t0 = time.perf_counter()
        try:
            compiled = compile_one(fn, dtype, const, warps, stages, arch)
            rec.update(shared_bytes=compiled.metadata.shared, fits=compiled.metadata.shared <= limit)
            if registers:
                rec.update(register_report(compiled.asm["ptx"], arch))
        except Exception as exc:  # a kernel that does not compile is the finding
            rec.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", fits=False)
            problems.append(f"{dtype} {group} {const}: does not compile: {rec['error']}")
        rec["compile_s"] = round(time.perf_counter() - t0, 2)
        records.append(rec)
        fits.setdefault((dtype, group), []).append(rec["fits"])
    for (dtype, group), oks in fits.items():
        if not any(oks):
            problems.append(f"{dtype} {group}: no configuration fits in {limit} bytes of shared memory on sm_{arch}")
    return records, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100/H200)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--json", default=None, help="write every configuration's record here")
    ap.add_argument("--registers", action="store_true", help="also report registers and spills (ptxas -v)")
    args = ap.parse_args(argv)
    records, problems = run(args.dtypes, args.arch, registers=args.registers)
    for r in records:
        size = f"{r['shared_bytes'] / 1024:7.1f} KiB" if "shared_bytes" in r else "    error"
        tile = "x".join(str(r[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in r)
        regs = f" {r['registers']:3} regs, {r['spill_store_bytes']:4} B spilled" if "registers" in r else ""
        print(f"{r['dtype']:5} {r['group']:28} {tile:11} warps {r['num_warps']} stages {r['num_stages']} "
              f"{size}{regs} {'fits' if r['fits'] else 'TOO BIG' if 'shared_bytes' in r else 'ERROR'}")
    if args.json:
        import triton

        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "records": records, "problems": problems},
                      f, indent=1)
    for p in problems:
        print("PROBLEM:", p)
    print(f"{len(records)} configurations, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
