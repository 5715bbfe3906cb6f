import os

import torch

# Nothing in the tests may download: models, tokenizers and data sets are built in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The cpp backend's GEMM choices are timed in each test process, not kept in the user's cache
# folder: tests that time choices anew must not read an earlier run's (test_gemm_choice_store.py
# tests the store, in folders of its own).
os.environ.setdefault("MSPLORA_CPU_GEMM_STORE", "process")

# Without a GPU, Triton kernels run on CPU tensors under the interpreter, which must
# be on before triton decorates any kernel. With a GPU they compile for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs per test, repeatable from the test's id.
    torch.manual_seed(sum(map(ord, request.node.nodeid)) * 7919 % (2**31))
    yield


@pytest.fixture(scope="session")
def emulated_cuda_ops(tmp_path_factory):
    """The cuda backend's launchers (csrc/cuda/msplora_cuda.cpp) built for CPU tensors with the
    emulated kernels (tests/cuda_emulation.py), once per session."""
    from cuda_emulation import build_launchers, gxx_major

    if gxx_major() < 12:
        pytest.skip("needs g++ 12 or newer (_Float16 stands in for __half)")
    return build_launchers(tmp_path_factory.mktemp("cuda_launchers"))


@pytest.fixture
def emulated_cuda_backend(emulated_cuda_ops):
    """A backend named "cuda-emulated" on CPU tensors, while the test runs: the cuda backend's
    record (capabilities included) over the emulated launchers' op table."""
    import dataclasses

    from msplora_kernels.ops import backends

    record = dataclasses.replace(backends.BACKENDS["cuda"], name="cuda-emulated", device_types=("cpu",),
                                 load_ops=lambda: emulated_cuda_ops, why_not=lambda device_type: [])
    backends.BACKENDS[record.name] = record
    backends.PREFERENCE["cpu"] = (*backends.PREFERENCE["cpu"], record.name)
    backends._available.cache_clear()
    yield record.name
    del backends.BACKENDS[record.name]
    backends._OP_TABLES.pop(record.name, None)
    backends.PREFERENCE["cpu"] = tuple(n for n in backends.PREFERENCE["cpu"] if n != record.name)
    backends._available.cache_clear()


# Test files that start processes (torchrun, venvs, pip, bench scripts), build or compile (the
# emulated CUDA launchers, sm_90 cubins) or run TRL and the Trainer: `make test-fast` (pytest -m
# "not slow") leaves them out for a quick loop; `make test`, what CI runs, runs everything.
SLOW_FILES = {
    "test_bench_smoke.py", "test_cuda_compile.py", "test_cuda_launchers_emulated.py", "test_distributed.py",
    "test_gemm_choice_store.py", "test_install.py", "test_missing_extras.py", "test_qlora_trainers.py",
    "test_readme.py", "test_trainer.py", "test_triton_sm90_compile.py", "test_trl.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: processes, builds, GPU compile checks, TRL and the Trainer "
                                       "(make test-fast leaves them out)")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
