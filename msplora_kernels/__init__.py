"""msplora_kernels: fused kernels and a drop-in layer for MSPLoRA fine-tuning.

The public API. Below it: models/ (layers, injection into models, adapter files), then ops/
(the functional form, autograd, the op contract, backends), then the per-device kernels
(csrc/ compiled as msplora_kernels._C, and triton_kernels/ installed as
msplora_kernels.triton_kernels).
"""
from ._extras import MissingExtraError
from ._version import __version__
from .errors import AdapterMismatchError, DtypeMismatchError, IncompleteAdapterError
from .models.adapter_io import adapter_state_dict, load_adapter, load_msplora, save_adapter
from .models.adapters import (active_adapters, adapter_names, add_weighted_adapter, delete_adapter, set_adapter,
                              using_adapter)
from .models.config import MSPLoraConfig
from .models.counts import print_trainable_parameters, summary
from .models.hub_upload import push_to_hub
from .models.factors import adapted_layers
from .models.inject import apply_msplora
from .models.layer import LoraLevel, MSPLoraLinear
from .models.merging import disable_adapters, merge_adapter, merge_and_unload, unload, unmerge_adapter
from .models.peft_export import export_peft
from .models.shared_base import shared_base_model
from .ops import native  # noqa: F401  (loads the compiled ops)
from .ops.backends import available_backends, backend_info, triton_gemm_choices
from .ops.functional import msplora_linear
from .ops.reference import msplora_linear_reference
from .ops.settings import configure



def __getattr__(name):
    # Imported on first use: they import transformers, which `import msplora_kernels` should not.
    if name == "SaveAdapterCallback":
        from .models.callbacks import SaveAdapterCallback

        return SaveAdapterCallback
    if name == "MSPLoraSpectrumCallback":
        from .analysis import MSPLoraSpectrumCallback

        return MSPLoraSpectrumCallback
    raise AttributeError(f"module 'msplora_kernels' has no attribute {name!r}")


__all__ = [
    "using_adapter",
    "set_adapter",
    "delete_adapter",
    "add_weighted_adapter",
    "adapter_names",
    "active_adapters",
    "AdapterMismatchError",
    "IncompleteAdapterError",
    "DtypeMismatchError",
    "LoraLevel",
    "MSPLoraConfig",
    "MSPLoraLinear",
    "MSPLoraSpectrumCallback",
    "MissingExtraError",
    "SaveAdapterCallback",
    "__version__",
    "adapted_layers",
    "adapter_state_dict",
    "apply_msplora",
    "available_backends",
    "backend_info",
    "configure",
    "disable_adapters",
    "export_peft",
    "load_adapter",
    "load_msplora",
    "merge_adapter",
    "merge_and_unload",
    "msplora_linear",
    "msplora_linear_reference",
    "print_trainable_parameters",
    "push_to_hub",
    "save_adapter",
    "shared_base_model",
    "summary",
    "triton_gemm_choices",
    "unload",
    "unmerge_adapter",
]
