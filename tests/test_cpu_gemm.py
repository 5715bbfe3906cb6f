"""The cpp backend's rank-R products on oneDNN or at::mm (csrc/cpu/rank_products.h): both are
checked against the reference, and the test can tell which one ran by T's memory layout."""
import pytest
import torch

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem
from msplora_kernels.backends import cpu_adapter_gemm

pytestmark = pytest.mark.skipif("cpp" not in mk.available_backends("cpu"), reason="needs the compiled cpp backend")
HAS_ONEDNN = torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")
# 256 x 512 x 14 = 1.8M multiply-adds: above the ~1M under which products stay on at::mm.
LARGE = dict(lead=(4, 64), in_f=512, out_f=384, ranks=(8, 4, 2))


def _shrink_layout(x, a) -> str:
    t = torch.ops.msplora.shrink(x, a, 0.0, torch.empty(0, dtype=torch.int64))
    torch.testing.assert_close(t, x @ a, rtol=1e-5, atol=1e-4)
    # oneDNN computes T row-major; at::mm's faster orientation gives a column-major view.
    return "row-major" if t.stride() == (a.shape[1], 1) else "column-major"


@pytest.mark.parametrize("mode", ["auto", "aten"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trained"])
def test_both_libraries_match_the_reference(monkeypatch, mode, dropout, train_base):
    monkeypatch.setenv("MSPLORA_CPU_GEMM", mode)
    problem = make_problem(LARGE["lead"], LARGE["in_f"], LARGE["out_f"], LARGE["ranks"], torch.float32,
                           train_base=train_base)
    check_backend_against_reference("cpp", problem, dropout_p=dropout, training=dropout > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_at_the_large_shape(dtype):
    # oneDNN takes fp32 only here; the other dtypes stay on at::mm and must still be right.
    problem = make_problem(LARGE["lead"], LARGE["in_f"], LARGE["out_f"], LARGE["ranks"], dtype)
    check_backend_against_reference("cpp", problem, dropout_p=0.1, training=True)


def test_the_choice_follows_the_environment_and_the_size(monkeypatch):
    x, a = torch.randn(256, 512), torch.randn(512, 14)
    monkeypatch.setenv("MSPLORA_CPU_GEMM", "aten")
    assert cpu_adapter_gemm() == "aten" and _shrink_layout(x, a) == "column-major"
    monkeypatch.delenv("MSPLORA_CPU_GEMM")
    assert cpu_adapter_gemm() == ("onednn" if HAS_ONEDNN else "aten")
    assert _shrink_layout(x, a) == ("row-major" if HAS_ONEDNN else "column-major")
    # A small product stays on at::mm, where oneDNN's setup would cost more than it saves.
    assert _shrink_layout(torch.randn(16, 64), torch.randn(64, 14)) == "column-major"


def test_an_unknown_choice_is_refused(monkeypatch):
    monkeypatch.setenv("MSPLORA_CPU_GEMM", "blis")
    x, a = torch.randn(256, 512), torch.randn(512, 14)
    with pytest.raises(RuntimeError, match=r"\$MSPLORA_CPU_GEMM=blis; choose 'auto'"):
        torch.ops.msplora.shrink(x, a, 0.0, torch.empty(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\$MSPLORA_CPU_GEMM='blis'"):
        cpu_adapter_gemm()
