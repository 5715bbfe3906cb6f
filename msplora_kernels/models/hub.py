"""Adapters from the Hugging Face Hub, as PEFT users share them: a repo id wherever a folder is
taken. Through huggingface_hub, so its cache, HF_HUB_OFFLINE and tokens apply as they do for every
other Hub download. The upload is hub_upload.py."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .._extras import require
from .config import CONFIG_NAME, WEIGHTS_NAME

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def adapter_folder(name_or_path, *, revision: Optional[str] = None, token=None, cache_dir=None) -> Path:
    """A local folder holding the adapter: `name_or_path` itself when it is a folder, else the Hub
    repo of that id ("org/name") at `revision`, downloaded into (or found in) the Hub cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not REPO_ID.match(str(name_or_path)):
        raise FileNotFoundError(f"no adapter folder {name_or_path!s}, and it is not a Hub repo id such as 'org/name'")
    hub = require("huggingface_hub", "loading an adapter from the Hub")
    try:
        folder = hub.snapshot_download(str(name_or_path), revision=revision, token=token, cache_dir=cache_dir,
                                       allow_patterns=[CONFIG_NAME, WEIGHTS_NAME], library_name="msplora-kernels")
    except Exception as exc:  # not found, offline without a cached copy, no access: say which repo
        raise FileNotFoundError(f"could not get the adapter {name_or_path} (revision {revision or 'main'}) from the "
                                f"Hub: {type(exc).__name__}: {exc}") from None
    return Path(folder)
