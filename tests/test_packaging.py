"""The built wheel: our Triton code only as msplora_kernels.triton_kernels, never a top-level
`triton_kernels` (that import name belongs to another package), and the compiled extension."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "MSPLORA_NO_CUDA": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("msplora_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"msplora_kernels"}, tops
    for module in ("__init__", "kernels", "ops", "configs"):
        assert f"msplora_kernels/triton_kernels/{module}.py" in names
    assert any(n.startswith("msplora_kernels/_C") and n.endswith(".so") for n in names)
    assert "msplora_kernels/analysis/__main__.py" in names
