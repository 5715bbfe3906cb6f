"""bench/throughput.py runs end to end on tiny shapes and writes a complete JSON and a PNG."""
import json
import subprocess
import sys
from pathlib import Path

import torch

import msplora_kernels as mk

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"case", "method", "backend", "device", "dtype", "tokens", "dropout", "in_features", "out_features",
          "ranks", "fwd_ms", "fwd_bwd_ms", "peak_mem_mb", "tokens_per_s"}


def run_bench(tmp_path, *extra):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--device", "cpu", "--quick", "--repeats", "2",
           "--json", str(out_json), "--plot", str(out_png), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Readable in a log: progress as plain lines, and no third-party line about what it never ran.
    assert "\r" not in proc.stderr and "runs, " in proc.stderr, proc.stderr[-2000:]
    assert "gemm_4bit_forward" not in proc.stderr, proc.stderr[-2000:]
    return proc.stdout, json.loads(out_json.read_text()), out_png


def test_layer_bench_tiny(tmp_path):
    stdout, data, png = run_bench(tmp_path, "--cases", "tiny")
    meta, records = data["meta"], data["records"]
    assert meta["torch"] and meta["device_name"] and "git_commit" in meta and meta["dtype"] == "float32"
    cpu_fused = [b for b in mk.available_backends("cpu") if b != "triton"]
    labels = [(r["method"], r["backend"]) for r in records]
    has_onednn = torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")
    onednn = [("linear_onednn", None)] if has_onednn else []
    assert labels == [("linear", None), *onednn, ("peft_lora", None), ("msplora_naive", None)] + \
        [("msplora", b) for b in cpu_fused]
    for r in records:
        assert FIELDS <= r.keys()
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["tokens_per_s"] > 0
        assert r["vs_linear"] > 0 and r["vs_peft_lora"] > 0 and r["vs_naive"] > 0
        assert r["dropout"] == 0.05  # the paper's, unless --dropout says otherwise
    naive = next(r for r in records if r["method"] == "msplora_naive")
    assert records[0]["vs_linear"] == 1.0 and naive["vs_naive"] == 1.0
    if onednn:  # the faster frozen linear is the floor of the other ratio
        fastest = min(r["fwd_bwd_ms"] for r in records if r["method"] in ("linear", "linear_onednn"))
        assert all(abs(r["vs_fastest_linear"] - r["fwd_bwd_ms"] / fastest) < 1e-9 for r in records)
    assert {r["trainable_params"] for r in records if r["method"].startswith("msplora")} == {(64 + 48) * 14}
    assert "msplora[cpp]" in stdout and "x linear" in stdout and "x naive" in stdout and "floor" in stdout
    # tiny: K=64, N=48, R=14 -> 1 + 3*14*112 / (2*64*48)
    assert {r["flop_floor_vs_linear"] for r in records if r["method"].startswith("msplora")} == {1 + 3 * 14 * 112 / 6144}
    assert records[0]["flop_floor_vs_linear"] is None
    # The least x peft_lora the FLOPs allow: the floor over the faster frozen linear, against PEFT's time.
    fastest = min(r["fwd_bwd_ms"] for r in records if r["method"] in ("linear", "linear_onednn"))
    peft = next(r["fwd_bwd_ms"] for r in records if r["method"] == "peft_lora")
    for r in records:
        expected = r["flop_floor_vs_linear"] * fastest / peft if r["flop_floor_vs_linear"] else None
        assert r["flop_floor_vs_peft"] == expected
    assert "floor x peft" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_step_quick(tmp_path):
    stdout, data, png = run_bench(tmp_path, "--model", "--methods", "peft_lora", "msplora", "--dropout", "0")
    records = data["records"]
    assert [r["method"] for r in records][:2] == ["no_adapter", "peft_lora"]
    assert {r["backend"] for r in records if r["method"] == "msplora"} >= {"cpp"}
    assert records[0]["trainable_params"] == 0 and all(r["trainable_params"] > 0 for r in records[1:])
    assert all(r["fwd_bwd_ms"] > 0 and FIELDS <= r.keys() and r["dropout"] == 0 for r in records)
    assert "x no_adapter" in stdout


def test_naive_baseline_computes_msplora(tmp_path):
    """The benchmark's naive baseline is the same function as the fused layer (dropout off)."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import methods

    case = methods.CASES["tiny"]
    torch.manual_seed(0)
    naive = methods.build("msplora_naive", None, case, "cpu", torch.float32, 0.0)
    fused = mk.MSPLoraLinear.from_linear(naive.base, ranks=case.ranks, lora_alpha=methods.ALPHA)
    with torch.no_grad():
        for lvl, a, b in zip(fused.levels, naive.lora_A, naive.lora_B):
            lvl.A.copy_(a.weight.T)
            lvl.B.copy_(b.weight.T)
    x = torch.randn(16, case.in_features, requires_grad=True)
    y_naive = naive(x)
    assert (y_naive - naive.base(x)).abs().max() > 1e-3  # the adapter is not zero
    torch.testing.assert_close(y_naive, fused(x), rtol=1e-5, atol=1e-5)


def test_gemm_floor_tiny(tmp_path):
    out = tmp_path / "floor.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gemm_floor.py"), "--case", "tiny", "--tokens", "64", "--repeats", "3",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["case"] == "tiny" and data["tokens"] == 64 and data["meta"]["device_name"]
    timings = data["timings"]
    # The floor is the eight GEMMs each on the fastest library here; torch's defaults are timed beside it.
    assert data["floor"] == "frozen + adapter GEMMs (fastest library each)"
    assert {"frozen GEMMs (torch)", "frozen + adapter GEMMs (torch)", data["floor"], "msplora[cpp] dropout 0.05",
            "msplora_naive[-] dropout 0"} <= timings.keys()
    assert isinstance(data["meta"]["cpu_gemm_choices"], list)
    assert all(t["median"] > 0 for t in timings.values())
    for ratios in data["summary"].values():
        floor = timings[data["floor"]]["median"]
        assert ratios["cpp_vs_gemm_floor"] > 0 and abs(ratios["gemm_floor_vs_naive"] * ratios["cpp_vs_gemm_floor"]
                                                       - ratios["cpp_vs_naive"]) < 1e-9, (ratios, floor)
    assert "GEMM floor / naive" in proc.stdout


def test_generation_bench_runs_and_reports_every_variant(tmp_path):
    # bench/generate.py: greedy generation unmerged against merged, and one layer's call at decode.
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--batches", "1", "--targets", "qv", "--new-tokens", "3",
           "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    gen = {r["method"]: r for r in records if r["kind"] == "generate"}
    assert set(gen) == {"base", "msplora_merged", "msplora_unmerged", "peft_lora_unmerged"}
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 3 for r in gen.values())
    assert gen["msplora_merged"]["vs_merged_tokens_per_s"] == 1.0
    calls = [r for r in records if r["kind"] == "layer_call"]
    assert {(r["tokens"], r["method"]) for r in calls} == {(t, m) for t in (1, 8) for m in ("linear", "peft_lora", "msplora")}
    assert "msplora_unmerged" in proc.stdout and "x peft_lora" in proc.stdout
