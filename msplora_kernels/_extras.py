"""Optional dependencies: imported where a feature needs one, with one clear line when it is missing."""
from __future__ import annotations

import importlib

# module -> the extra of msplora-kernels that installs it
EXTRAS = {"matplotlib": "plots", "transformers": "hf", "peft": "hf", "triton": "triton", "bitsandbytes": "quant"}


class MissingExtraError(ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra."""


def install_hint(module: str) -> str:
    return f"pip install 'msplora-kernels[{EXTRAS[module]}]'"


def require(module: str, feature: str):
    """Import `module` for `feature`, or raise MissingExtraError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f"{feature} needs {module}, which is not installed: {install_hint(module)}") from None
