"""The cpp backend's GEMMs on ATen or oneDNN, chosen by measurement (csrc/cpu/gemms.h): every path
the choice can take, forced through the cpu_gemm setting, against the reference and its fake
kernels, on any CPU; and the choices themselves, per GEMM and shape class."""
import os
import subprocess
import sys

import pytest
import torch

import msplora_kernels as mk
from helpers import HAS_BF16_DOT, check_backend_against_reference, make_problem
from msplora_kernels.ops import settings
from msplora_kernels.ops.native import gemm_choices

pytestmark = pytest.mark.skipif("cpp" not in mk.available_backends("cpu"), reason="needs the compiled cpp backend")
HAS_ONEDNN = torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")
MODES = [m for m in settings.CHOICES["cpu_gemm"] if HAS_ONEDNN or "onednn" not in m]
# 256 x 512 x 14: sizes where either library could be the faster.
LARGE = dict(lead=(4, 64), in_f=512, out_f=384, ranks=(8, 4, 2))


@pytest.fixture
def cpu_gemm(request):
    with settings.overridden(cpu_gemm=request.param):
        yield request.param


@pytest.mark.parametrize("cpu_gemm", MODES, indirect=True)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trained"])
def test_every_path_matches_the_reference(cpu_gemm, dropout, train_base):
    problem = make_problem(LARGE["lead"], LARGE["in_f"], LARGE["out_f"], LARGE["ranks"], torch.float32,
                           train_base=train_base)
    check_backend_against_reference("cpp", problem, dropout_p=dropout, training=dropout > 0)


@pytest.mark.parametrize("cpu_gemm", MODES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_on_every_path(cpu_gemm, dtype):
    # oneDNN takes fp32 and bf16 here; fp64 and fp16 fall back to ATen under any setting.
    problem = make_problem(LARGE["lead"], LARGE["in_f"], LARGE["out_f"], LARGE["ranks"], dtype)
    check_backend_against_reference("cpp", problem, dropout_p=0.1, training=True)


def _choices_for(fn):
    torch.ops.msplora.forget_gemm_choices()
    fn()
    return gemm_choices()


def _layer_step(in_f=512, out_f=384, tokens=256, dtype=torch.float32):
    layer = mk.MSPLoraLinear(in_f, out_f, ranks=(8, 4, 2), dropout=0.1, backend="cpp", dtype=dtype).train()
    x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)
    return lambda: layer(x).sum().backward()


def test_auto_measures_each_gemm_once_per_shape_class_and_says_what_it_chose():
    step = _layer_step()
    lines = _choices_for(step)
    gemms = [line.split(" Float ")[0] for line in lines]
    assert sorted(gemms) == sorted(["shrink: x A", "expand: T B", "frozen: x W^T", "grad: dT = dy B^T",
                                    "grad: dB = T^T dy", "grad: mask * (dT A^T)", "frozen: dy W",
                                    "grad: dA = x^T dT"])
    # Every candidate was timed, and the fastest kept; a second step measures nothing new.
    for line in lines:
        assert " us" in line and "->" in line
    step()
    assert gemm_choices() == lines
    # Another token count in the same power-of-two class reuses the choices; another class does not.
    _layer_step(tokens=200)()
    assert len(gemm_choices()) == len(lines)
    _layer_step(tokens=1000)()
    assert len(gemm_choices()) == 2 * len(lines)


def test_the_masked_and_unmasked_dx_terms_are_chosen_apart():
    # Without a mask a library adds dT A^T straight into dx; with one it needs a temporary and a
    # pass more: one choice for both kept the masked pick where the unmasked term ran twice as slow.
    torch.ops.msplora.forget_gemm_choices()
    x = torch.randn(256, 512, requires_grad=True)
    for p in (0.1, 0.0):
        layer = mk.MSPLoraLinear(512, 384, ranks=(8, 4, 2), dropout=p, backend="cpp").train()
        layer(x).sum().backward()
    lines = gemm_choices()
    assert sum(line.startswith("grad: mask * (dT A^T) ") for line in lines) == 1, lines
    assert sum(line.startswith("grad: dT A^T ") for line in lines) == 1, lines


def test_big_gemms_are_timed_cold_and_small_ones_hot():
    # At 256 tokens, 512 -> 384 fp32: the frozen GEMMs' operands take 1.7 MB (timed after the
    # caches are evicted and the heap given back), the shrink's 0.6 MB (timed as they are).
    lines = _choices_for(_layer_step())
    for line in lines:
        assert ("(cold: " if line.startswith("frozen") else "(hot: " if line.startswith("shrink") else "(") in line, line


@pytest.mark.parametrize("mode,names", [("aten", {"aten:plain", "aten:transposed"}),
                                        ("onednn:plain", {"onednn:plain"}), ("aten:transposed", None)])
def test_a_setting_restricts_the_candidates(mode, names):
    if "onednn" in mode and not HAS_ONEDNN:
        pytest.skip("this torch has no oneDNN")
    with settings.overridden(cpu_gemm=mode):
        lines = _choices_for(_layer_step())
    chosen = {line.split(" -> ")[1].split(" ")[0] for line in lines}
    if names is None:  # transposed where the GEMM can take it, plain where its output must stay row-major
        assert chosen == {"aten:transposed", "aten:plain"}
        assert all(line.split(" -> ")[1].startswith("aten:plain") for line in lines if line.startswith(("frozen", "expand", "grad: mask * (dT A^T)")))
    else:
        assert chosen <= names


@pytest.mark.parametrize("tokens,in_f,rank", [(40, 64, 16), (33, 77, 13), (70, 100, 9), (5, 3, 2), (9, 4096, 112)])
def test_a_transposed_bf16_product_is_copied_to_row_major_exactly(tokens, in_f, rank):
    # csrc/cpu/transpose.h: the aten:transposed candidate's column-major dA (in_f x rank), copied
    # in 8 x 32 blocks and element by element at the ragged edges, equals ATen's copy bit for bit.
    x, dt = torch.randn(tokens, in_f).bfloat16(), torch.randn(tokens, rank).bfloat16()
    torch.ops.msplora.forget_gemm_choices()
    with settings.overridden(cpu_gemm="aten:transposed"):
        da = torch.ops.msplora.grad_a(x, dt, 0.0, torch.tensor([11]))
        [line] = gemm_choices()
    assert "-> aten:transposed" in line, line
    assert da.shape == (in_f, rank) and da.is_contiguous()
    assert torch.equal(da, torch.mm(dt.t(), x).t().contiguous())


def test_fused_runs_our_kernels_where_they_apply_and_auto_times_them():
    # The products that write a whole (M, N) tensor (expand, dx's adapter term) have our fused
    # kernel as a candidate, and in bf16 on CPUs with AVX512-BF16 the thin products ours too (the
    # shrink, dT with dB in one pass, dA: test_thin_product.py); the frozen GEMMs fall back to
    # ATen under cpu_gemm=fused.
    full_width = ("expand: T B", "grad: dT A^T", "grad: mask * (dT A^T)")
    thin = ("shrink: x A", "grad: dT and dB in one pass over dy", "grad: dA = x^T dT")
    for dtype in (torch.float32, torch.bfloat16):
        with settings.overridden(cpu_gemm="fused"):
            lines = _choices_for(_layer_step(dtype=dtype))
        ours_thin = dtype == torch.bfloat16 and HAS_BF16_DOT
        for line in lines:
            chosen = line.split(" -> ")[1].split(" ")[0]
            expected = "fused" if line.startswith(full_width) else "thin" if ours_thin and line.startswith(thin) else "aten:plain"
            assert chosen == expected, line
        lines = _choices_for(_layer_step(dtype=dtype))
        timed = [line for line in lines if line.startswith(full_width)]
        assert len(timed) == 2 and all("fused " in line and " us" in line for line in timed), timed
    # fp64 keeps its precision: never our fp32-accumulating kernel.
    with settings.overridden(cpu_gemm="fused"):
        lines = _choices_for(_layer_step(dtype=torch.float64))
    assert not any("-> fused" in line for line in lines)


@pytest.mark.parametrize("cpu_gemm", ["auto", "aten:transposed", "onednn:plain", "fused"], indirect=True)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fake_kernels_state_the_real_strides(cpu_gemm, p):
    # torch.compile plans with the fake kernels' strides; they must hold for every choice.
    if "onednn" in cpu_gemm and not HAS_ONEDNN:
        pytest.skip("this torch has no oneDNN")
    ops, seed = torch.ops.msplora, torch.tensor([11], dtype=torch.int64)
    x, w, bias = torch.randn(256, 512), torch.randn(384, 512), torch.randn(384)
    a, b, dy = torch.randn(512, 14), torch.randn(14, 384), torch.randn(256, 384)
    t = ops.shrink(x, a, p, seed)
    dt, _ = ops.grad_t_b(dy, t, b)
    _, bits = ops.dropout_keep_mask(x, p, seed)
    for op, args in [(ops.shrink, (x, a, p, seed)), (ops.expand_linear, (x, w, bias, t, b)), (ops.grad_t_b, (dy, t, b)),
                     (ops.grad_x, (dy, w, dt, a, p, seed)), (ops.grad_a, (x, dt, p, seed)),
                     (ops.dropout_keep_mask, (x, p, seed)), (ops.shrink_keep_mask, (x, a, p, seed)),
                     (ops.grad_x_bits, (dy, w, dt, a, bits, p)), (ops.grad_a_bits, (x, dt, bits, p))]:
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


_COLD_CHOICE_RSS = """
import torch, msplora_kernels  # noqa: F401
def rss_mb():
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS:"))
a, seed = torch.randn(512, 16), torch.tensor([1])
torch.ops.msplora.shrink(torch.randn(64, 512), a, 0.0, seed)  # timed hot; loads the libraries
before = rss_mb()
for tokens in (1024, 2048):  # operands over 1 MB: timed cold, with the cache sweep
    torch.ops.msplora.shrink(torch.randn(tokens, 512), a, 0.0, seed)
print(rss_mb() - before)
print(torch.ops.msplora.gemm_choices())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_timing_a_choice_cold_leaves_no_sweep_buffer_resident():
    # The sweep over twice the last-level cache once stayed allocated for the process: 256 MB of
    # resident memory on a VM whose sysconf reported the package's 320 MB L3.
    proc = subprocess.run([sys.executable, "-c", _COLD_CHOICE_RSS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    grown_mb, choices = float(lines[0]), lines[1:]
    assert sum("(cold:" in line for line in choices) == 2, choices
    assert grown_mb < 32, f"resident memory grew by {grown_mb:.1f} MB over two cold choices"
