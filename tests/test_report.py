"""`python -m msplora_kernels`: the environment report a bug report needs."""
import json
import subprocess
import sys

import torch

import msplora_kernels as mk
from msplora_kernels.ops import settings
from msplora_kernels.report import environment, format_report


def test_the_report_says_what_a_bug_report_needs():
    env = environment()
    assert env["msplora_kernels"] == mk.__version__ and env["versions"]["torch"] == torch.__version__
    assert env["extension"]["loaded"] and env["extension"]["install_build"]["torch"] == torch.__version__
    assert env["cpu"]["model"] and isinstance(env["cpu"]["isa"], list)
    text = format_report(env)
    for line in ("compiled extension: loaded, built at install for torch", "CPU: ", "GPU: ", "settings: backend=",
                 "  cpp: cpu: available", "  cuda: cpu: not available (runs on cuda tensors only)",
                 "ATen, oneDNN or our kernels per GEMM and shape class (cpu_gemm=auto)"):
        assert line in text, line
    with settings.overridden(cpu_gemm="aten"):
        assert "cpu_gemm=aten (configure())" in format_report(environment())


def test_the_command_prints_text_and_json():
    text = subprocess.run([sys.executable, "-m", "msplora_kernels"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and text.stdout.startswith(f"msplora-kernels {mk.__version__}"), text.stderr[-2000:]
    as_json = subprocess.run([sys.executable, "-m", "msplora_kernels", "--json"], capture_output=True, text=True,
                             timeout=300)
    assert as_json.returncode == 0 and set(json.loads(as_json.stdout)) >= {"versions", "extension", "cpu", "gpus",
                                                                            "settings", "backends"}
