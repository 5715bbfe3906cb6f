"""Every Triton launch configuration compiles for sm_90 (H100/H200) and fits its shared memory.

Runs without a GPU: Triton compiles down to a cubin with its bundled ptxas. The interpreter that
conftest.py turns on would replace the kernels by Python functions, so the check runs in a child
process without it. fp16 uses bf16's tiles and element size, so bf16 stands for both.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _nvidia_backend_missing():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # an install without the NVIDIA backend cannot compile for sm_90
        return f"triton has no NVIDIA backend here: {exc}"
    return None


@pytest.mark.skipif(_nvidia_backend_missing() is not None, reason=str(_nvidia_backend_missing()))
def test_every_launch_configuration_compiles_and_fits_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # One child per dtype, side by side (compiling is single-threaded), each with a fresh cache so
    # that every kernel is compiled, not read back from an earlier run.
    children = {}
    for dtype in ("bf16", "fp32"):
        out = tmp_path / f"{dtype}.json"
        cmd = [sys.executable, "-m", "msplora_kernels.triton_kernels.compile_check", "--arch", "90",
               "--dtypes", dtype, "--json", str(out)]
        children[dtype] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                 env={**env, "TRITON_CACHE_DIR": str(tmp_path / f"cache-{dtype}")}))
    for dtype, (out, child) in children.items():
        stdout, stderr = child.communicate(timeout=1200)
        assert out.exists(), stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["problems"] == [], report["problems"]
        assert child.returncode == 0, stdout[-3000:]
        records = report["records"]
        assert {r["kernel"] for r in records} == {"shrink", "expand_linear", "shrink_expand_linear", "grad_t_b",
                                                  "grad_x", "grad_a", "dropout_mask"}
        assert all("error" not in r for r in records)
        # The fixed-tile kernels have no autotuner to skip a configuration: each must fit.
        for r in records:
            if r["kernel"] not in ("expand_linear", "shrink_expand_linear", "grad_x"):
                assert r["fits"] and r["shared_bytes"] <= 227 * 1024, (dtype, r)
