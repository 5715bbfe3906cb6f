"""Ops: the functional form, its autograd, the op contract, the backends and their registration.

    functional.py   msplora_linear: checks, backend choice, the call
    validation.py   msplora_linear's argument checks
    autograd.py     FusedMSPLoRAFunction, which composes any backend's op table
    contract.py     the primitive ops every backend provides: names, shapes, layouts
    reference.py    the math in plain PyTorch: the oracle, and the "torch" backend's ops
    backends.py     the backends as typed records, and the choice among them
    settings.py     process-wide choices (default backend, GEMM libraries, Triton forward)
    native.py       the compiled ops (csrc/): loading, fake kernels, settings
    triton_ops.py   the Triton launchers (triton_kernels/) registered as ops
    derivatives.py  each op's own derivative, for direct calls and opcheck
"""
