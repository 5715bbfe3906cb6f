"""`python -m msplora_kernels`: the environment report a bug report needs."""
import json
import subprocess
import sys

import torch

import msplora_kernels as mk
from msplora_kernels.ops import settings
from msplora_kernels.ops.cpu_info import cpu_label
from msplora_kernels.report import environment, format_report


def _first_cpuinfo_value(key):
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), None)


def test_the_report_says_what_a_bug_report_needs():
    env = environment()
    assert env["msplora_kernels"] == mk.__version__ and env["versions"]["torch"] == torch.__version__
    assert env["extension"]["loaded"] and env["extension"]["install_build"]["torch"] == torch.__version__
    assert env["cpu"]["model"] and isinstance(env["cpu"]["isa"], list)
    text = format_report(env)
    # Family and model number, where /proc/cpuinfo has them: hypervisors give generations one name.
    family = _first_cpuinfo_value("cpu family")
    if family is not None:
        assert env["cpu"]["family"] == family and env["cpu"]["model_number"] == _first_cpuinfo_value("model")
        assert f"family {family}, model {env['cpu']['model_number']}" in text
        assert cpu_label() == f"{env['cpu']['model']} (family {family}, model {env['cpu']['model_number']})"
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
