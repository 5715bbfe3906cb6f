"""Sharing an adapter on the Hugging Face Hub: the adapter files and a model card that says how
to load it."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .._extras import require
from .adapter_io import save_adapter
from .counts import summary
from .factors import adapter_named
from .hub import REPO_ID


def model_card(model: nn.Module, repo_id: str, base_model: Optional[str], adapter_name: Optional[str] = None) -> str:
    name = adapter_named(model, "push_to_hub", adapter_name)
    config, counts = model.msplora_factors.configs[name], summary(model)
    base = f"base_model: {base_model}\n" if base_model else ""
    cls = type(model)
    if cls.__module__.startswith("transformers.") and base_model:
        imports, load_base = f"from transformers import {cls.__name__}\n", f'{cls.__name__}.from_pretrained("{base_model}")'
    else:
        imports, load_base = "", "...  # the base model the adapter was trained on"
    return f"""---
library_name: msplora-kernels
tags:
- msplora
- lora
{base}---

# MSPLoRA adapter

A multi-scale pyramid LoRA adapter (MSPLoRA, Zhao, Yu and Yang, 2025) made with
[msplora-kernels](https://pypi.org/project/msplora-kernels/).

- targets: {config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)}
- ranks per level: {"/".join(map(str, config.ranks))}, groups: {", ".join("per layer" if g is None else str(g) for g in config.groups)}
- trainable parameters: {counts["total"]:,} ({counts["lora_equivalent"]:,} for LoRA at rank {counts["lora_rank"]} on the same layers)

## Load

```python
import msplora_kernels as mk
{imports}
base = {load_base}
model = mk.load_msplora(base, "{repo_id}")
```

`mk.export_peft(model, folder)` writes it as a standard PEFT LoRA adapter for serving.
"""


def push_to_hub(model: nn.Module, repo_id: str, *, private: Optional[bool] = None, token=None,
                revision: Optional[str] = None, commit_message: str = "Upload MSPLoRA adapter",
                base_model: Optional[str] = None, api=None, adapter_name: Optional[str] = None) -> str:
    """Upload one adapter (the active one unless named: adapter_config.json,
    adapter_model.safetensors) and a model card that says how to load it to the Hub repo `repo_id`,
    creating the repo if needed; returns the repo's URL. In a distributed run call it on every
    rank; only rank 0 uploads. `api` defaults to huggingface_hub.HfApi(token=token)."""
    name = adapter_named(model, "push_to_hub", adapter_name)
    if not REPO_ID.match(repo_id):
        raise ValueError(f"push_to_hub: repo_id must look like 'org/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder, adapter_name=name)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return f"https://huggingface.co/{repo_id}"
        (Path(folder) / "README.md").write_text(model_card(model, repo_id, base_model, name))
        if api is None:
            api = require("huggingface_hub", "push_to_hub").HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message,
                          repo_type="model")
    return str(getattr(repo, "url", repo) or f"https://huggingface.co/{repo_id}")
