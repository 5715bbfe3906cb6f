"""Python-side registrations of the compiled msplora ops: fake kernels for torch.compile.

The schemas and the device kernels live in csrc/; the dispatcher picks the CPU
or CUDA kernel from the tensors' device, so the "cpp" and "cuda" backends share
this one op table.
"""
from __future__ import annotations

import torch

from . import _native

if _native.loaded():

    # The kernels return T and dT row-major, and dA row-major on CUDA but as a column-major view
    # on the CPU, whichever GEMM library ran (see msplora_cpu.cpp); the fake kernels report the
    # same strides so that compiled graphs agree with eager.
    def _grad_a_layout(like, rows, cols):
        if like.device.type == "cpu":
            return like.new_empty((cols, rows)).t()
        return like.new_empty((rows, cols))

    @torch.library.register_fake("msplora::shrink")
    def _(x, a, p, seed):
        return x.new_empty((x.shape[0], a.shape[1]))

    @torch.library.register_fake("msplora::expand_linear")
    def _(x, weight, bias, t, b):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("msplora::grad_t_b")
    def _(dy, t, b):
        return dy.new_empty((dy.shape[0], b.shape[0])), dy.new_empty((b.shape[0], b.shape[1]))

    @torch.library.register_fake("msplora::grad_x")
    def _(dy, weight, dt, a, p, seed):
        return dy.new_empty((dy.shape[0], weight.shape[1]))

    @torch.library.register_fake("msplora::grad_a")
    def _(x, dt, p, seed):
        return _grad_a_layout(x, x.shape[1], dt.shape[1])

    @torch.library.register_fake("msplora::dropout_mask")
    def _(x, p, seed):
        return x.new_empty(x.shape)

    @torch.library.register_fake("msplora::dropout")
    def _(x, p, seed):
        return x.new_empty(x.shape)


    from .op_autograd import register, register_dropout

    register("msplora")
    register_dropout("msplora")


def op_table():
    """The compiled ops, with the names every fused backend provides."""
    return torch.ops.msplora
