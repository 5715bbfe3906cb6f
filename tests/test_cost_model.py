"""The GPU cost model (bench/cost_model.py) on the CPU: the launch plan it costs is the one the
autograd Function runs, and its counts follow from the shapes."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cost_model  # noqa: E402
import methods  # noqa: E402


@pytest.mark.parametrize("path", ["fused", "cublas"])
def test_the_plan_hashes_the_mask_once_and_reads_it_after(path):
    case = methods.CASES["llama2-7b"]
    m, k, n, r = 2048, case.in_features, case.out_features, sum(case.ranks)
    pred = cost_model.predict(case, m, 0.05, path, cost_model.DEVICES["h100"])
    kernels = [c["kernel"] for c in pred["kernels"]]
    if path == "fused":
        assert kernels == ["shrink", "expand_linear", "grad_t_b", "grad_x", "grad_a"]
    else:
        assert kernels == ["shrink", "cublas.addmm", "cublas.addmm_", "grad_t_b", "cublas.mm", "grad_x", "grad_a"]
    hashes = {c["kernel"]: c["mhashes"] for c in pred["kernels"]}
    # One rank block at R = 112 (bf16 blocks of 128): the shrink hashes every element once; the
    # backward reads the packed mask instead.
    assert hashes["shrink"] == round(m * k / 1e6, 1) and hashes["grad_x"] == hashes["grad_a"] == 0
    # The fused expand reads x, W, T, B and writes y once: its compulsory bytes, in bf16.
    if path == "fused":
        expand = pred["kernels"][1]
        assert expand["mb"] == round(2 * (m * k + n * k + m * r + r * n + m * n) / 1e6, 1)
        assert expand["gflop"] == round(2 * m * n * (k + 128) / 1e9, 2)


def test_without_dropout_nothing_hashes_and_the_ratio_is_above_the_flop_floor():
    for name in methods.DEFAULT_CASES:
        case = methods.CASES[name]
        for dev in cost_model.DEVICES.values():
            pred = cost_model.predict(case, case.gpu_tokens, 0.0, "fused", dev)
            assert all(c["mhashes"] == 0 for c in pred["kernels"])
            k, n, r = case.in_features, case.out_features, sum(case.ranks)
            assert pred["ratio"] >= 1 + 3 * r * (k + n) / (2 * k * n)


def test_throughput_predict_prints_the_table_without_a_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--predict", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| roberta-base") or
            line.startswith("| llama2-7b")]
    # Two cases x three devices x two paths at the paper's dropout.
    assert len(rows) == 12 and all("H100" in r or "H200" in r or "A100" in r for r in rows)
