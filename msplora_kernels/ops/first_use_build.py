"""The compiled extension built on first use, for the running torch, where none was built at install.

The same sources and flags as setup.py's build (msplora_kernels/_build.py), compiled with ninja by
torch.utils.cpp_extension into a cache folder keyed by this package's version, the torch version
and a hash of the sources, so a second process loads it at once and another torch gets its own.
Set MSPLORA_FIRST_USE_BUILD=0 (read when the package is imported) to skip it.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import torch

from .. import _build
from .._version import __version__

LIBRARY_NAME = "msplora_C"


def enabled() -> bool:
    return os.environ.get("MSPLORA_FIRST_USE_BUILD", "1") != "0"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "msplora_kernels"


def _cuda_wanted() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return _build.wants_cuda(torch.version.cuda, CUDA_HOME)


def sources_digest(sources: list[str]) -> str:
    """12 hex digits of the sources and every header: a build of other code gets another."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(Path(path).read_bytes())
    for header in sorted(Path(_build.csrc_dir()).rglob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:12]


def build_dir(sources: list[str], cuda: bool) -> Path:
    flavour = f"cu{torch.version.cuda}" if cuda else "cpu"
    return cache_root() / f"{__version__}-torch{torch.__version__}-{flavour}-{sources_digest(sources)}"


def _with_elapsed_line(label: str, fn):
    """Run fn, showing a line with the seconds elapsed while it runs (compiling takes a while); in a
    log rather than a terminal, the line once."""
    if not sys.stderr.isatty():
        print(label, file=sys.stderr, flush=True)
        return fn()
    from tqdm import tqdm

    stop = threading.Event()
    bar = tqdm(total=None, desc=label, bar_format="{desc} {elapsed}", file=sys.stderr, leave=True)

    def tick():
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        stop.set()
        thread.join()
        bar.close()


def load() -> Path:
    """Build (once) and load the extension for the running torch; returns its build folder.
    Raises whatever the compiler or the loader raised."""
    from torch.utils.cpp_extension import load as load_extension

    cuda = _cuda_wanted()
    sources = _build.sources(_build.csrc_dir(), cuda)
    folder = build_dir(sources, cuda)
    folder.mkdir(parents=True, exist_ok=True)
    args = _build.compile_args(cuda)
    built = (folder / f"{LIBRARY_NAME}.so").is_file()

    def compile_and_load():
        load_extension(name=LIBRARY_NAME, sources=sources, extra_cflags=args["cxx"],
                       extra_cuda_cflags=args.get("nvcc"), extra_ldflags=_build.link_args(),
                       extra_include_paths=[str(_build.csrc_dir())], build_directory=str(folder),
                       is_python_module=False, verbose=False)

    if built:
        compile_and_load()  # ninja finds nothing to do
    else:
        start = time.monotonic()
        _with_elapsed_line(f"msplora_kernels: compiling the extension for torch {torch.__version__} (first use; "
                           f"cached in {folder})", compile_and_load)
        print(f"msplora_kernels: compiled in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return folder
