"""The tree's layers: public API -> models -> ops -> kernels, each importing only from below it.

Every import of every module is read from its source (those inside functions too) and resolved
to the package it names; triton_kernels/ must import nothing from msplora_kernels at all.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The installed name of each folder, and its layer: higher numbers may import lower ones.
PACKAGES = {"msplora_kernels": ROOT / "msplora_kernels", "msplora_kernels.triton_kernels": ROOT / "triton_kernels"}
LAYER = {"api": 3, "models": 2, "ops": 1, "kernels": 0, "leaf": 0}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["msplora_kernels", "triton_kernels"]:
        return "kernels"
    if parts[:2] in (["msplora_kernels", n] for n in ("errors", "_version", "_extras", "_build", "_C")):
        return "leaf"  # exception types, the version, optional imports, the compiled library: any layer may use them
    if len(parts) > 1 and parts[1] in ("models", "ops"):
        return parts[1]
    return "api"


def modules():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([package, *parts]), path, path.name == "__init__.py"


def imports_of(module: str, path: Path, is_package: bool):
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import x` imports the submodule x.
            yield from ((f"{target}.{a.name}" for a in node.names) if node.module is None else [target])


ALL = list(modules())


@pytest.mark.parametrize("module,path,is_package", ALL, ids=[m for m, _, _ in ALL])
def test_imports_point_down(module, path, is_package):
    own = layer_of(module)
    for target in imports_of(module, path, is_package):
        if not target.startswith("msplora_kernels"):
            continue
        if own == "kernels":
            assert layer_of(target) == "kernels", f"{module} (a kernel module) imports {target}"
        else:
            assert LAYER[layer_of(target)] <= LAYER[own], f"{module} ({own}) imports {target} ({layer_of(target)})"


def test_the_kernel_package_is_a_leaf_once_installed():
    # Relative imports above the package would reach msplora_kernels once installed.
    for module, path, is_package in ALL:
        if layer_of(module) == "kernels":
            targets = list(imports_of(module, path, is_package))
            assert all(not t.startswith("msplora_kernels") or t.startswith("msplora_kernels.triton_kernels")
                       for t in targets), (module, targets)
