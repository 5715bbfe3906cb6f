"""Without an optional dependency, a feature that needs it says in one line which extra to install,
and whatever can still be done is done (the analysis writes its metrics without matplotlib)."""
import json
import subprocess
import sys

import msplora_kernels as mk
from models import tiny_bert


def run_without(module, code, *args):
    """Run `code` in a fresh interpreter in which `module` cannot be imported."""
    script = f"import sys\nsys.modules[{module!r}] = None\n" + code
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)


def test_analysis_without_matplotlib_writes_the_metrics_and_says_so(tmp_path):
    model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())
    mk.save_adapter(model, tmp_path / "adapter")
    code = "import runpy\nsys.argv = ['analysis'] + sys.argv[1:]\nrunpy.run_module('msplora_kernels.analysis', run_name='__main__')"
    proc = run_without("matplotlib", code, str(tmp_path / "adapter"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["levels"]
    assert not list((tmp_path / "out").glob("*.png"))
    # Other packages may write to stderr on import (bitsandbytes does); ours is one line.
    lines = [line for line in proc.stderr.splitlines() if "matplotlib" in line or "msplora" in line]
    assert "Traceback" not in proc.stderr
    assert lines == ["no figures: the analysis figures needs matplotlib, which is not installed: "
                     "pip install 'msplora-kernels[plots]'"], proc.stderr


def test_export_without_peft_names_the_extra(tmp_path):
    code = f"""
import msplora_kernels as mk
sys.path.insert(0, {str(mk_tests())!r})
from models import tiny_bert
model = mk.apply_msplora(tiny_bert(), mk.MSPLoraConfig())
try:
    mk.export_peft(model, {str(tmp_path)!r})
except mk.MissingExtraError as exc:
    print(exc)
"""
    proc = run_without("peft", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "export_peft needs peft, which is not installed: pip install 'msplora-kernels[hf]'"


def test_the_triton_backend_without_triton_names_the_extra():
    code = """
import torch
import msplora_kernels as mk
print(mk.backend_info()["backends"]["triton"]["why_not"]["cpu"][-1])
x = torch.randn(2, 4)
try:
    mk.msplora_linear(x, torch.randn(3, 4), None, [torch.randn(4, 2)], [torch.randn(2, 3)], [1.0], backend="triton")
except RuntimeError as exc:
    print(exc)
"""
    proc = run_without("triton", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = proc.stdout.strip().splitlines()
    assert first == "triton is not installed (pip install 'msplora-kernels[triton]')"
    assert "not available for device cpu" in second and "msplora-kernels[triton]" in second


def mk_tests():
    from pathlib import Path

    return Path(__file__).resolve().parent


def test_the_package_imports_and_runs_without_any_extra():
    code = """
import torch
sys.modules.update({m: None for m in ("peft", "transformers", "triton")})
import msplora_kernels as mk
layer = mk.MSPLoraLinear(8, 4)
print(mk.available_backends('cpu')[0], tuple(layer(torch.randn(2, 8)).shape))
"""
    proc = run_without("matplotlib", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpp (2, 4)", proc.stderr[-2000:]
