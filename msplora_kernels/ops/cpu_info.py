"""The CPU this process runs on: model name and the instruction sets that decide CPU speed."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

# The flags (as /proc/cpuinfo spells them) that change which CPU code paths are fast.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8", "asimd", "sve")


@functools.lru_cache(maxsize=None)
def cpu_info() -> dict:
    """{"model": ..., "isa": [flags present], "machine": ..., "family": ..., "model_number": ...};
    /proc/cpuinfo on Linux, else what the platform module knows. Family and model number tell apart
    CPUs that a hypervisor names alike ("AMD EPYC" is family 25 on Zen 4, 26 on Zen 5)."""
    model, flags, numbers = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
            elif key in ("cpu family", "model") and key not in numbers:
                numbers[key] = value.strip()
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "isa": [f for f in ISA_FLAGS if f in flags],
            "family": numbers.get("cpu family"), "model_number": numbers.get("model")}


def cpu_label(info: dict | None = None) -> str:
    """The model name, with its family and model number where /proc/cpuinfo gives them; of this
    process's CPU, or of `info` as cpu_info() wrote it (a report from another machine)."""
    info = info or cpu_info()
    if info.get("family") is None:
        return info["model"]
    return f"{info['model']} (family {info['family']}, model {info['model_number']})"
