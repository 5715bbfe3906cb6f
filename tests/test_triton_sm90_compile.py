"""Every Triton launch the launchers make, compiled for sm_90 (H100/H200) and sm_80 (A100) as a
real launch compiles it (triton_kernels/compile_check.py), without a GPU.

The interpreter that conftest.py turns on would replace the kernels by Python functions, so the
checks run in child processes without it.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
KERNELS = {"shrink", "expand_linear", "shrink_expand_linear", "grad_t_b", "grad_x", "grad_a", "dropout_mask", "dropout"}
LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _nvidia_backend_missing():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # an install without the NVIDIA backend cannot compile for sm_90
        return f"triton has no NVIDIA backend here: {exc}"
    return None


pytestmark = pytest.mark.skipif(_nvidia_backend_missing() is not None, reason=str(_nvidia_backend_missing()))


def _child_env(tmp_path, name):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return {**env, "TRITON_CACHE_DIR": str(tmp_path / f"cache-{name}")}  # compile, do not read back


# A launch as Triton's own run() specializes it, captured by a stand-in driver: the check must agree.
SAME_AS_RUN = r'''
import json, sys, torch
import triton
from triton.backends.compiler import GPUTarget
from msplora_kernels.triton_kernels import compile_check, kernels
from msplora_kernels.triton_kernels.compile_check import SHAPES, configurations, recorded_launches, specialized

class StandInDriver:  # what JITFunction.run asks of a GPU driver, for an sm_90 that is not here
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(StandInDriver())
out = []
for shape in (SHAPES[1], SHAPES[2]):
    for kernel, args, kwargs in recorded_launches("bf16", shape, 90):
        if isinstance(kernel, str):  # a cuBLAS call of the cuBLAS path
            continue
        for fn, kw in configurations(kernel, kwargs)[:1]:
            seen = {}
            def capture(key, signature, device, constexprs, options, attrs, warmup, seen=seen):
                seen.update(signature=signature, constexprs=constexprs, attrs=attrs)
            fn._do_compile = capture
            fn.run(*args, grid=(1,), warmup=True, **kw)
            del fn._do_compile
            sig, const, attrs, _ = specialized(fn, args, kw, 90)
            out.append([fn.__name__, shape[0], seen["signature"] == sig, seen["constexprs"] == const,
                        seen["attrs"] == attrs])
print(json.dumps(out))
'''


def test_the_checks_specialization_is_the_one_a_launch_gets(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SAME_AS_RUN], capture_output=True, text=True, timeout=900,
                          env=_child_env(tmp_path, "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r[0].replace("_kernel", "") for r in rows} == KERNELS
    assert all(r[2] and r[3] and r[4] for r in rows), [r for r in rows if not all(r[2:])]


def test_every_launch_fits_unspilled_on_sm90_and_sm80(tmp_path):
    # One child per architecture, side by side (compiling is single-threaded). bf16, the dtype of
    # GPU training, keeps this under the CI budget; the committed report (bench/results/
    # triton-compile-*.json) covers fp16 and fp32 (IEEE and TF32) as well.
    children = {}
    for arch in (90, 80):
        out = tmp_path / f"sm{arch}.json"
        cmd = [sys.executable, "-m", "msplora_kernels.triton_kernels.compile_check", "--arch", str(arch),
               "--dtypes", "bf16", "--json", str(out)]
        children[arch] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                env=_child_env(tmp_path, arch)))
    for arch, (out, child) in children.items():
        stdout, stderr = child.communicate(timeout=1500)
        assert out.exists(), stderr[-3000:]
        report = json.loads(out.read_text())
        records = report["records"]
        assert {r["kernel"] for r in records} == KERNELS
        # Every configuration a launch may run (each one an autotuner may pick) compiles, fits
        # the architecture's shared memory, spills nothing, and on sm_90 runs its tensor-core
        # dots on wgmma. IEEE fp32 dots are the expected exception to wgmma: they run on FMAs.
        assert report["problems"] == [], report["problems"][:5]
        assert all(r["shared_bytes"] <= LIMIT[arch] and r["spill_store_bytes"] == 0 for r in records)
        assert all(r["fences"] == 0 for r in records if r["kernel"] in ("grad_t_b", "grad_a"))  # relaxed atomics
        # The launch's specialization is what was compiled: unit strides are constants, and
        # 16-divisible sizes carry the hint, except at the odd shapes.
        llama = [r for r in records if r["shape"] == "llama2-7b" and r["kernel"] == "shrink"]
        assert llama and all({"stride_xk", "stride_ar", "stride_tr"} <= set(r["constant_args"]) for r in llama)
        assert all({"M", "K", "x_ptr"} <= set(r["divisible_by_16"]) for r in llama)
        odd = [r for r in records if r["shape"].startswith("odd") and r["kernel"] == "shrink"]
        assert odd and all("K" not in r["divisible_by_16"] for r in odd)
        # The cuBLAS path's epilogue (grad_x with N = 0, accumulating) and the packed-mask
        # variants are among the launches.
        assert any(r["kernel"] == "grad_x" and r.get("ACCUMULATE") for r in records)
        assert any(r["kernel"] == "shrink" and r.get("KEEP_BITS") for r in records)
        assert {r["kernel"] for r in records if r.get("MASK_BITS")} == {"grad_x", "grad_a"}
        if arch == 90:
            gemm = [r for r in records if r["kernel"] == "expand_linear"]
            assert gemm and all(r["wgmma"] > 0 for r in gemm)
