"""The triton backend's two paths for its frozen GEMMs (triton_kernels/gemm_paths.py): fused in the
Triton kernels, or on cuBLAS with the LoRA term added by Triton. Both are checked against the
reference under the interpreter, and the automatic choice with a stand-in timer."""
import pytest
import torch

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem
from msplora_kernels.ops import settings

pytestmark = pytest.mark.skipif(
    "triton" not in mk.available_backends("cpu"), reason="triton is not importable or TRITON_INTERPRET is not 1"
)


@pytest.fixture
def paths():
    from msplora_kernels.triton_kernels import gemm_paths

    gemm_paths.forget()
    yield gemm_paths
    gemm_paths.forget()
    gemm_paths.TIMER = gemm_paths._default_timer


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_each_path_against_the_reference(paths, path, dtype, bias):
    # Ragged sizes, dropout on: the cuBLAS path's Triton epilogue masks and adds dT A^T into dy W.
    problem = make_problem((3, 13), 40, 24, (8, 4, 2), dtype, bias=bias)
    with settings.overridden(triton_gemm=path):
        check_backend_against_reference("triton", problem, dropout_p=0.2, training=True)
    assert paths.choices() == []  # a forced path times nothing


class StandInTimer:
    """Times a path by running it once and returning a scripted time for it (fused first)."""

    def __init__(self, fused_ms, cublas_ms):
        self.times, self.calls = [fused_ms, cublas_ms], 0

    def __call__(self, fn):
        out = fn()
        assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
        ms = self.times[self.calls % 2]
        self.calls += 1
        return ms


@pytest.mark.parametrize("faster", ["fused", "cublas"])
def test_auto_keeps_the_faster_path_once_per_bucket(paths, faster):
    paths.TIMER = timer = StandInTimer(*((1.0, 2.0) if faster == "fused" else (2.0, 1.0)))
    problem = make_problem((37,), 40, 24, (8, 4, 2), torch.float32)
    with settings.overridden(triton_gemm="auto"):
        check_backend_against_reference("triton", problem, dropout_p=0.2, training=True)
        chosen = paths.choices()
        # expand_linear in the forward and grad_x in the backward, each timed on both paths.
        assert sorted(c["op"] for c in chosen) == ["expand_linear", "grad_x"]
        assert all(c["path"] == faster for c in chosen) and timer.calls == 4
        assert all({c["fused_ms"], c["cublas_ms"]} == {1.0, 2.0} for c in chosen)
        assert [c["m_bucket"] for c in chosen] == [64, 64]
        # Another token count in the same bucket reuses the choice; a new bucket times again.
        again = dict(dropout_p=0.2, training=True)
        check_backend_against_reference("triton", make_problem((50,), 40, 24, (8, 4, 2), torch.float32), **again)
        assert timer.calls == 4 and len(paths.choices()) == 2
        check_backend_against_reference("triton", make_problem((70,), 40, 24, (8, 4, 2), torch.float32), **again)
        assert timer.calls == 8 and sorted(c["m_bucket"] for c in paths.choices()) == [64, 64, 128, 128]


def test_the_choice_is_visible(paths):
    paths.TIMER = StandInTimer(3.0, 1.5)
    with settings.overridden(triton_gemm="auto"):
        mk.msplora_linear(*make_problem((20,), 16, 16, (4, 2), torch.float32), backend="triton").sum().backward()
    listed = mk.triton_gemm_choices()
    assert {c["op"] for c in listed} == {"expand_linear", "grad_x"} and all(c["path"] == "cublas" for c in listed)
    assert "2 chosen so far" in mk.backend_info()["backends"]["triton"]["gemm_library"]
    with pytest.raises(ValueError, match="sets triton_gemm='fast'"):
        mk.configure(triton_gemm="fast")


def test_without_a_timer_the_cpu_interpreter_takes_the_fused_path(paths):
    # The real timer needs a GPU: on CPU tensors auto runs the fused kernels and records nothing.
    with settings.overridden(triton_gemm="auto"):
        check_backend_against_reference("triton", make_problem((9,), 16, 8, (4,), torch.float32))
    assert paths.choices() == []
