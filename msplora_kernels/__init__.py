"""msplora_kernels: fused kernels and a drop-in layer for MSPLoRA fine-tuning."""
from . import _native, native_ops  # noqa: F401  (load the compiled ops and their fake kernels)
from .backends import available_backends
from .errors import AdapterMismatchError, DtypeMismatchError
from .functional import msplora_linear
from .layer import LoraLevel, MSPLoraLinear
from .reference import msplora_linear_reference

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "DtypeMismatchError",
    "LoraLevel",
    "MSPLoraLinear",
    "available_backends",
    "msplora_linear",
    "msplora_linear_reference",
]
