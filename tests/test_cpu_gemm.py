"""The cpp backend's rank-R products on oneDNN or at::mm (csrc/cpu/rank_products.h): both are
checked against the reference and their fake kernels, and the test tells which library ran from
the exact bits of T (the two libraries round differently)."""
import pytest
import torch

import msplora_kernels as mk
from helpers import check_backend_against_reference, make_problem
from msplora_kernels.ops import settings
from msplora_kernels.ops.native import cpu_adapter_gemm

pytestmark = pytest.mark.skipif("cpp" not in mk.available_backends("cpu"), reason="needs the compiled cpp backend")
HAS_ONEDNN = torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")
# 256 x 512 x 14 = 1.8M multiply-adds: above the ~1M under which products stay on at::mm.
LARGE = dict(lead=(4, 64), in_f=512, out_f=384, ranks=(8, 4, 2))


def _shrink_libraries(x, a) -> set:
    """The libraries whose product T equals bit for bit (at small sizes they can agree)."""
    t = torch.ops.msplora.shrink(x, a, 0.0, torch.empty(0, dtype=torch.int64))
    assert t.is_contiguous()  # row-major from either library: the fake kernel says so
    found = {"aten"} if torch.equal(t, torch.mm(a.t(), x.t()).t()) else set()
    if HAS_ONEDNN and torch.equal(t, torch.ops.mkldnn._linear_pointwise(x, a.t(), None, "none", [], None)):
        found.add("onednn")
    return found


@pytest.fixture
def cpu_gemm(request):
    with settings.overridden(cpu_gemm=request.param):
        yield request.param


@pytest.mark.parametrize("cpu_gemm", ["auto", "aten"], indirect=True)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trained"])
def test_both_libraries_match_the_reference(cpu_gemm, dropout, train_base):
    problem = make_problem(LARGE["lead"], LARGE["in_f"], LARGE["out_f"], LARGE["ranks"], torch.float32,
                           train_base=train_base)
    check_backend_against_reference("cpp", problem, dropout_p=dropout, training=dropout > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_at_the_large_shape(dtype):
    # oneDNN takes fp32 only here; the other dtypes stay on at::mm and must still be right.
    problem = make_problem(LARGE["lead"], LARGE["in_f"], LARGE["out_f"], LARGE["ranks"], dtype)
    check_backend_against_reference("cpp", problem, dropout_p=0.1, training=True)


def test_the_choice_follows_the_setting_and_the_size():
    x, a = torch.randn(256, 512), torch.randn(512, 14)
    with settings.overridden(cpu_gemm="aten"):
        assert cpu_adapter_gemm() == "aten" and _shrink_libraries(x, a) == {"aten"}
        assert torch.ops.msplora.get_setting("cpu_gemm") == "aten"
    if HAS_ONEDNN:
        with settings.overridden(cpu_gemm="onednn"):
            assert _shrink_libraries(x, a) == {"onednn"} and torch.ops.msplora.get_setting("cpu_gemm") == "onednn"
    assert cpu_adapter_gemm() == ("onednn" if HAS_ONEDNN else "aten")
    assert _shrink_libraries(x, a) == {cpu_adapter_gemm()}
    # A small product stays on at::mm, where oneDNN's setup would cost more than it saves.
    assert "aten" in _shrink_libraries(torch.randn(16, 64), torch.randn(64, 14))


@pytest.mark.parametrize("cpu_gemm", ["auto", "aten"], indirect=True)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fake_kernels_state_the_real_strides_at_the_large_shape(cpu_gemm, p):
    # torch.compile plans with the fake kernels' strides; they must hold for either library.
    ops, seed = torch.ops.msplora, torch.tensor([11], dtype=torch.int64)
    x, w, bias = torch.randn(256, 512), torch.randn(384, 512), torch.randn(384)
    a, b, dy = torch.randn(512, 14), torch.randn(14, 384), torch.randn(256, 384)
    t = ops.shrink(x, a, p, seed)
    dt, _ = ops.grad_t_b(dy, t, b)
    for op, args in [(ops.shrink, (x, a, p, seed)), (ops.expand_linear, (x, w, bias, t, b)), (ops.grad_t_b, (dy, t, b)),
                     (ops.grad_x, (dy, w, dt, a, p, seed)), (ops.grad_a, (x, dt, p, seed))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_an_unknown_choice_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"configure\(\) sets cpu_gemm='blis'; choose one of \['auto'"):
        mk.configure(cpu_gemm="blis")
    monkeypatch.setenv("MSPLORA_CPU_GEMM", "blis")
    with pytest.raises(ValueError, match=r"\$MSPLORA_CPU_GEMM sets cpu_gemm='blis'"):
        settings.from_environment()
    assert settings.get("cpu_gemm") == "auto"  # nothing was set
    with pytest.raises(RuntimeError, match="setting cpu_gemm cannot be 'blis'"):
        torch.ops.msplora.set_setting("cpu_gemm", "blis")


def test_compiled_layer_matches_eager_at_the_large_shape():
    # torch.compile at a shape where oneDNN runs the products: compiled equals eager.
    torch._dynamo.reset()
    layer = mk.MSPLoraLinear(512, 384, ranks=(8, 4, 2), dropout=0.2, backend="cpp")
    for lvl in layer.levels:
        torch.nn.init.normal_(lvl.B, std=0.1)
    x = torch.randn(4, 64, 512)

    def run(fn):
        layer.zero_grad()
        torch.manual_seed(5)
        y = fn(x)
        (y.float() * torch.linspace(-1, 1, 384)).sum().backward()  # a non-uniform output gradient
        return y.detach(), [p.grad.clone() for p in layer.parameters() if p.requires_grad]

    y, grads = run(layer)
    with torch._inductor.config.patch(fallback_random=True):
        y_c, grads_c = run(torch.compile(layer, fullgraph=True))
    torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-4)
    assert len(grads) == len(grads_c) == 6
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-4)
