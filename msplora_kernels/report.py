"""The environment report, `python -m msplora_kernels`: what a bug report needs.

Versions, the compiled extension (how it loaded, or why not), every backend on every device here
(available or why not), the CPU with the instruction sets that matter, the GPU with its compute
capability, and every setting and GEMM library in force.
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import _build
from ._version import __version__
from .ops import backends
from .ops.cpu_info import cpu_info, cpu_label


def _version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    gpus = [{"name": torch.cuda.get_device_name(i), "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info = backends.backend_info()
    info["extension"]["install_build"] = _build.read_build_info()
    return {
        "msplora_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version_of(d) for d in ("torch", "triton", "transformers", "peft", "bitsandbytes",
                                                   "huggingface_hub")},
        "torch_cuda": torch.version.cuda,
        "cpu": {**cpu_info(), "threads": torch.get_num_threads()},
        "gpus": gpus,
        **info,
    }


def format_report(env: dict) -> str:
    lines = [f"msplora-kernels {env['msplora_kernels']} (python {env['python']}, {env['platform']})"]
    lines += [f"  {name}: {version}" for name, version in env["versions"].items()]
    lines.append(f"  torch built with CUDA: {env['torch_cuda'] or 'no'}")
    ext = env["extension"]
    lines.append("compiled extension: " + (f"loaded, {ext['how']}" if ext["loaded"] else f"not loaded: {ext['why_not']}"))
    cpu = env["cpu"]
    lines.append(f"CPU: {cpu_label(cpu)}, {cpu['machine']}, {cpu['threads']} threads, "
                 f"ISA: {', '.join(cpu['isa']) or 'none of note'}")
    lines.append("GPU: " + ("; ".join(f"{g['name']} (compute capability {g['compute_capability']})" for g in env["gpus"])
                            or "none"))
    lines.append("settings: " + ", ".join(f"{name}={v['value']} ({v['source']})" for name, v in env["settings"].items()))
    lines.append("backends:")
    for name, b in env["backends"].items():
        where = ", ".join(f"{device}: {'available' if ok else 'not available (' + '; '.join(b['why_not'][device]) + ')'}"
                          for device, ok in b["available"].items())
        lines.append(f"  {name}: {where}")
        lines.append(f"    {b['summary']}; dtypes: {b['dtypes'] if isinstance(b['dtypes'], str) else ', '.join(b['dtypes'])}")
        lines.append(f"    GEMMs: {b['gemm_library']}; keeps dropout(x) for dA: {b['keeps_dropped_input']}; "
                     f"one-pass forward: {b['one_pass_forward']}")
    return "\n".join(lines)
