"""Adapter files: adapter_config.json and adapter_model.safetensors, PEFT-style.

The file holds exactly the trainable numbers: every LoraLevel once (shared levels under the
root container's names), nothing of the base model. Loading checks everything first and
copies only when the whole file fits, so a mismatched file loads nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, MSPLoraConfig
from .adapter_tensors import adapter_entries, adapter_state_dict, tensors_to_write
from .adapters import delete_adapter
from .hub import adapter_folder
from ..errors import AdapterMismatchError
from .factors import FACTORS_ATTR, adapter_named, require_adapter
from .inject import apply_msplora
from .layer import DEFAULT_ADAPTER
from .merging import unload
from .transformers_adapter import without_peft_prefix

_SHOW = 5  # names listed in an error before "and N more"


def save_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors to `directory`: the adapter
    `adapter_name` there; without a name every adapter of the model, in PEFT's layout (the one
    named "default" in `directory`, each other one in `directory/<name>`).

    In a distributed run only rank 0 writes. Under DeepSpeed ZeRO-3 or FSDP2 call it on every
    rank: each sharded tensor is gathered in turn, and every rank must take part. A tensor that is
    still not whole (an engine it cannot gather) makes it refuse and write nothing. A DDP-wrapped
    model is unwrapped."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    require_adapter(model, "save_adapter")
    configs = model.msplora_factors.configs
    if adapter_name is not None:
        folders = {adapter_named(model, "save_adapter", adapter_name): Path(directory)}
    else:
        folders = {name: Path(directory) if name == DEFAULT_ADAPTER else Path(directory) / name for name in configs}
    # Every tensor is gathered before anything is written, so a refusal writes nothing.
    written = {name: tensors_to_write(model, "save_adapter", name) for name in folders}
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    for name, folder in folders.items():
        _write(folder, configs[name], written[name])


def _write(directory: Path, config: MSPLoraConfig, tensors: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(directory / WEIGHTS_NAME),
              metadata={"format": "pt", "adapter_type": "MSPLORA"})


RESUME_INDEX = "model.safetensors.index.json"
RESUME_WEIGHTS = "msplora_resume.safetensors"


def write_resume_index(model: nn.Module, directory) -> None:
    """A shard index (model.safetensors.index.json) for the Trainer's resume, which loads a
    checkpoint through its index (see SaveAdapterCallback): it sends the "default" adapter's
    tensors to the adapter_model.safetensors that save_adapter wrote beside it (its names there are
    the model's), and every other adapter's to msplora_resume.safetensors, written here under the
    model's names. Call it on every rank after save_adapter; rank 0 writes."""
    from safetensors.torch import save_file

    directory = Path(directory)
    weight_map, others = {}, {}
    for name in model.msplora_factors.configs:
        if name == DEFAULT_ADAPTER:
            weight_map.update({e.model_key: WEIGHTS_NAME for e in adapter_entries(model, name)})
        else:
            by_file = tensors_to_write(model, "save_adapter", name)
            others.update({e.model_key: by_file[e.file_key] for e in adapter_entries(model, name)})
    weight_map.update({key: RESUME_WEIGHTS for key in others})
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    if others:
        save_file({k: t.contiguous() for k, t in others.items()}, str(directory / RESUME_WEIGHTS),
                  metadata={"format": "pt"})
    index = {"metadata": {"msplora_adapter_only": True}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / RESUME_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _listing(names) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {path.parent}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterMismatchError(f"load_adapter: {path} is corrupted or truncated: {exc}") from None


def _older_sharing_hint(directory: Path, names_differ) -> str:
    # Before 0.2.0, layers with one module name shared their levels wherever they sat (T5's self-
    # and cross-attention 'q'); since then they share by place, so such a file has other factors.
    if not names_differ:
        return ""
    try:
        version = json.loads((directory / CONFIG_NAME).read_text()).get("msplora_version", "0")
        older = tuple(int(part) for part in str(version).split(".")[:2]) < (0, 2)
    except (ValueError, OSError, AttributeError):
        return ""
    if not older:
        return ""
    return (f". The adapter was saved by msplora-kernels {version}, which shared a level between all layers of one "
            "module name, such as T5's self- and cross-attention 'q'; since 0.2.0 layers share by their place in the "
            "layer, as the paper's code does, so where one name sits in several places the factors differ. Train "
            "the adapter again, or load it with msplora-kernels<0.2")


def _config_differences(saved: MSPLoraConfig, current: MSPLoraConfig) -> list[str]:
    a, b = saved.to_dict(), current.to_dict()
    for runtime in ("backend", "init_lora_weights"):  # how it runs, how it started: not the adapter itself
        a.pop(runtime, None), b.pop(runtime, None)
    return [f"{k}: file {a[k]!r} vs model {b[k]!r}" for k in a if a[k] != b.get(k)]


def load_adapter(model: nn.Module, directory, adapter_name: Optional[str] = None) -> nn.Module:
    """Load an adapter saved by save_adapter into the model's adapter `adapter_name` (the active
    one unless named), which has the same MSPLoRA config.

    Raises AdapterMismatchError naming the layers (missing, unexpected or misshapen tensors,
    a different config, a corrupted file) and then has loaded nothing."""
    directory = Path(directory)
    name = adapter_named(model, "load_adapter", adapter_name)
    current = model.msplora_factors.configs[name]
    try:
        saved = MSPLoraConfig.from_pretrained(directory)
    except ValueError as exc:
        raise AdapterMismatchError(f"load_adapter: {exc}") from None
    diffs = _config_differences(saved, current)
    if diffs:
        raise AdapterMismatchError(f"load_adapter: {directory / CONFIG_NAME} differs from the model's config: " + "; ".join(diffs))
    tensors = without_peft_prefix(_read_tensors(directory / WEIGHTS_NAME))
    params = adapter_state_dict(model, name)
    problems = []
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing:
        problems.append(f"missing from the file: {_listing(missing)}")
    if unexpected:
        problems.append(f"not in the model: {_listing(unexpected)}")
    shapes = [f"{k} file {tuple(tensors[k].shape)} vs model {tuple(params[k].shape)}"
              for k in params.keys() & tensors.keys() if tensors[k].shape != params[k].shape]
    if shapes:
        problems.append(f"shape mismatch: {_listing(shapes)}")
    bad_dtype = [k for k, t in tensors.items() if not t.is_floating_point()]
    if bad_dtype:
        problems.append(f"non-float tensors: {_listing(bad_dtype)}")
    if problems:
        raise AdapterMismatchError(f"load_adapter: {directory / WEIGHTS_NAME} does not fit the model ({'; '.join(problems)}); "
                                   f"nothing was loaded{_older_sharing_hint(directory, missing or unexpected)}")
    if any(p.is_meta for p in params.values()):
        raise AdapterMismatchError("load_adapter: the model's adapter is on the meta device; materialize it first")
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key].to(device=p.device, dtype=p.dtype))
    return model


def load_msplora(model: nn.Module, directory, *, adapter_name: str = DEFAULT_ADAPTER, autocast_adapter_dtype: bool = True,
                 revision=None, token=None, cache_dir=None) -> nn.Module:
    """Apply MSPLoRA from a saved adapter's config, then load its weights, as the adapter
    `adapter_name`. On a model that has adapters already it is added beside them, inactive (as
    apply_msplora adds one); set_adapter makes it the active one. On any error the model is left as
    it was. autocast_adapter_dtype as in apply_msplora.

    `directory` is a folder, or a Hugging Face Hub repo id ("org/name"), downloaded at `revision`
    with `token` into the Hub cache (or `cache_dir`); HF_HUB_OFFLINE=1 takes it from the cache. A
    folder that save_adapter wrote from a model with several adapters holds "default" itself and
    each other adapter in a sub-folder of its name: load that sub-folder."""
    directory = adapter_folder(directory, revision=revision, token=token, cache_dir=cache_dir)
    config = MSPLoraConfig.from_pretrained(directory)
    had_adapters = hasattr(model, FACTORS_ATTR)
    apply_msplora(model, config, autocast_adapter_dtype=autocast_adapter_dtype, adapter_name=adapter_name)
    try:
        load_adapter(model, directory, adapter_name)
    except Exception:
        if had_adapters:
            delete_adapter(model, adapter_name)
        else:
            unload(model)
        raise
    return model
