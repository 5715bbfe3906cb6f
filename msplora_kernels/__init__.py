"""msplora_kernels: fused kernels and a drop-in layer for MSPLoRA fine-tuning."""
from . import _native, native_ops  # noqa: F401  (load the compiled ops and their fake kernels)
from .adapter_io import adapter_state_dict, load_adapter, load_msplora, save_adapter
from .backends import available_backends
from .config import MSPLoraConfig
from .errors import AdapterMismatchError, DtypeMismatchError
from .functional import msplora_linear
from .layer import LoraLevel, MSPLoraLinear
from .model import (
    adapted_layers,
    apply_msplora,
    disable_adapters,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    summary,
    unload,
    unmerge_adapter,
)
from .peft_export import export_peft
from .reference import msplora_linear_reference

__version__ = "0.1.0"

__all__ = [
    "AdapterMismatchError",
    "DtypeMismatchError",
    "LoraLevel",
    "MSPLoraConfig",
    "MSPLoraLinear",
    "adapted_layers",
    "adapter_state_dict",
    "apply_msplora",
    "available_backends",
    "disable_adapters",
    "export_peft",
    "load_adapter",
    "load_msplora",
    "merge_adapter",
    "merge_and_unload",
    "msplora_linear",
    "msplora_linear_reference",
    "print_trainable_parameters",
    "save_adapter",
    "summary",
    "unload",
    "unmerge_adapter",
]
