"""The SVD analyses: exact metrics on known spectra, factor SVD vs full SVD, KL properties, CLI, callback."""
import json
import math
import subprocess
import sys

import pytest
import torch

import msplora_kernels as mk
from msplora_kernels.analysis import (
    MSPLoraSpectrumCallback,
    SpectrumRecorder,
    effective_rank_space,
    entropy_effective_rank,
    factor_singular_values,
    kl_matrix,
)
from models import randomize_adapter, tiny_bert

PNG = b"\x89PNG\r\n\x1a\n"


def _orthonormal(n, r):
    q, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    return q


def test_known_spectrum_gives_exact_metric():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    a = _orthonormal(30, 4) * sigma          # A = U diag(sigma)
    b = _orthonormal(20, 4).T                # B = V^T
    got = factor_singular_values(a, b, scale=0.5)
    torch.testing.assert_close(got, sigma * 0.5)
    assert effective_rank_space(got) == pytest.approx([0.4, 0.7, 0.9, 1.0], abs=1e-12)
    flat = torch.ones(5, dtype=torch.float64)
    assert entropy_effective_rank(flat) == pytest.approx(5.0)
    assert entropy_effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank_space(torch.zeros(3)) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("m,r,n", [(64, 8, 48), (33, 5, 70), (16, 16, 16)])
def test_factor_svd_equals_full_svd(m, r, n):
    a, b = torch.randn(m, r, dtype=torch.float64), torch.randn(r, n, dtype=torch.float64)
    torch.testing.assert_close(factor_singular_values(a, b, 2.0), torch.linalg.svdvals(2.0 * a @ b)[:r])


def test_kl_identical_is_zero_and_nonnegative_otherwise():
    s = torch.rand(6, dtype=torch.float64) + 0.1
    kl = kl_matrix([s, s.clone(), 3 * s])  # scaling does not change the normalized spectrum
    torch.testing.assert_close(kl, torch.zeros(3, 3, dtype=torch.float64), atol=1e-15, rtol=0)
    spectra = [torch.rand(k, dtype=torch.float64) for k in (4, 6, 2, 6)] + [torch.zeros(3), torch.tensor([1.0, 0, 0])]
    kl = kl_matrix(spectra)  # unequal lengths and zeros
    assert torch.isfinite(kl).all()
    assert (kl >= -1e-12).all() and (kl.diagonal() == 0).all()
    assert kl.max() > 0.01


def _saved_adapter(tmp_path):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(modules_to_save=["classifier"]))
    randomize_adapter(model, std=0.3)
    mk.save_adapter(model, tmp_path / "adapter")
    mk.export_peft(model, tmp_path / "lora")
    return model


def test_metrics_from_model_and_file_agree(tmp_path):
    from msplora_kernels.analysis import analyze, pairs_from_dir, pairs_from_model

    model = _saved_adapter(tmp_path)
    pairs, config = pairs_from_dir(tmp_path / "adapter")
    from_file = analyze(pairs, config)
    from_model = analyze(pairs_from_model(model), model.msplora_config)
    assert json.dumps(from_file) == json.dumps(from_model)
    assert [row["factor_pairs"] for row in from_file["levels"]] == [2, 6, 8]
    assert sorted(from_file["layer_kl"]) == ["query", "value"]
    assert len(from_file["layer_kl"]["query"]["kl"]) == 4


def test_cli_writes_json_and_pngs(tmp_path):
    _saved_adapter(tmp_path)
    rec = SpectrumRecorder(top_k=4)
    model = mk.load_msplora(tiny_bert(), tmp_path / "adapter")
    for step in (0, 5, 10):
        with torch.no_grad():
            for name, p in mk.adapter_state_dict(model).items():
                if name.endswith(".B"):
                    p.mul_(1.5)
        rec.record(model, step)
    rec.save(tmp_path / "spectra.json")
    out = tmp_path / "analysis"
    cmd = [sys.executable, "-m", "msplora_kernels.analysis", str(tmp_path / "adapter"), "--compare-lora",
           str(tmp_path / "lora"), "--spectra", str(tmp_path / "spectra.json"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"levels", "factors", "layer_kl", "lora_layer_kl", "kl_difference"} <= metrics.keys()
    for d in metrics["kl_difference"].values():
        assert all(math.isfinite(v) for row in d["kl_difference"] for v in row)
    for name in ("effective_rank.png", "layer_kl.png", "spectra_over_time.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert "mean layer-specific KL, MSPLoRA minus LoRA" in proc.stdout


def test_recorder_and_trainer_callback(tmp_path):
    from transformers import Trainer, TrainingArguments
    from test_trainer import Toy

    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig(modules_to_save=["classifier"]))
    callback = MSPLoraSpectrumCallback(every_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Toy(), callbacks=[callback]).train()
    rec = callback.recorder
    assert rec.steps == [2, 3, 4]  # every 2 steps, plus the end of epoch 1 (3 steps of 8 samples)
    assert rec.levels() == [0, 1, 2]
    mat = rec.level_matrix(0)
    assert mat.shape == (8, len(rec.steps)) and mat[:, -1].sum() > 0  # B moved off zero
