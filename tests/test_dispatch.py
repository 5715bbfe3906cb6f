"""Backend discovery, the automatic choice, the default-backend setting and explicit naming."""
import pytest
import torch

import msplora_kernels as mk
from msplora_kernels.ops import settings
from msplora_kernels.ops.backends import resolve_backend
from helpers import make_problem


def test_cpu_backends_listed_best_first():
    names = mk.available_backends("cpu")
    assert names[0] == "cpp" and "torch" in names and "cuda" not in names


def test_triton_listed_on_cpu_only_under_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in mk.available_backends("cpu")


def test_meta_device_uses_torch():
    assert mk.available_backends("meta") == ["torch"]


def test_setting_overrides_automatic_choice():
    with settings.overridden(backend="torch"):
        assert resolve_backend(None, "cpu") == "torch"
        assert resolve_backend("cpp", "cpu") == "cpp"  # the argument wins over the setting
    assert resolve_backend(None, "cpu") == "cpp"


def test_env_var_sets_the_default_backend_once(monkeypatch):
    # Read when the package loads (from_environment), not on every call.
    monkeypatch.setenv("MSPLORA_BACKEND", "torch")
    assert resolve_backend(None, "cpu") == "cpp"
    try:
        settings.from_environment()
        assert resolve_backend(None, "cpu") == "torch" and settings.source("backend") == "$MSPLORA_BACKEND"
    finally:
        mk.configure(backend=None)


def test_unavailable_backend_lists_available(monkeypatch):
    x, w, b, As, Bs, s = make_problem((2,), 8, 8, (2,), torch.float32)
    with pytest.raises(RuntimeError, match=r"'cuda' is not available .*available: \['cpp', 'torch'"):
        mk.msplora_linear(x, w, b, As, Bs, s, backend="cuda")
    monkeypatch.setenv("MSPLORA_BACKEND", "cuda")
    try:
        settings.from_environment()
        with pytest.raises(RuntimeError, match=r"\$MSPLORA_BACKEND='cuda' is not available .*runs on cuda tensors"):
            mk.msplora_linear(x, w, b, As, Bs, s)
    finally:
        mk.configure(backend=None)
    with pytest.raises(ValueError, match="unknown backend"):
        mk.msplora_linear(x, w, b, As, Bs, s, backend="cudnn")
    with pytest.raises(ValueError, match=r"configure\(\) sets backend='cudnn'; choose one of"):
        mk.configure(backend="cudnn")


def test_triton_backend_imports_wherever_triton_is_installed():
    # A broken kernel module would otherwise only make the triton tests skip.
    import importlib.util

    from msplora_kernels.ops.backends import _triton_import_error

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert _triton_import_error() is None


def test_cpu_triton_listed_under_the_interpreter(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mk.available_backends("cpu")[-1] == "triton"
