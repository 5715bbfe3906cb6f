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
    """{"model": ..., "isa": [flags present], "machine": ...}; /proc/cpuinfo on Linux, else what
    the platform module knows."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model name") and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "isa": [f for f in ISA_FLAGS if f in flags]}
