"""Whole copies of the adapter's tensors for writing, whatever engine sharded them.

DeepSpeed ZeRO-3 keeps each rank's partition of a parameter aside and leaves the parameter itself
an empty tensor; FSDP2 makes it a DTensor whose local part is a shard. A file written from either
as it stands holds empty or partial tensors, and nothing complains. So every writer (save_adapter,
and through it the Trainer callback and push_to_hub; export_peft) takes its tensors from here:
gathered one at a time where an engine we know sharded them (a module_to_save such as lm_head may
be large: never the whole adapter at once), copied while whole, and checked against the shape each
must have. Whatever engine left a tensor short, the writer refuses and writes nothing.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import IncompleteAdapterError


def is_zero3_partitioned(p: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: its data lives in partitions (p.ds_tensor), gathered on demand."""
    return hasattr(p, "ds_id")


def is_dtensor(p: torch.Tensor) -> bool:
    """An FSDP2 (DTensor) parameter: its local part is a shard, full_tensor() gathers it."""
    return callable(getattr(p, "full_tensor", None))


def is_sharded(p: torch.Tensor) -> bool:
    """Whether an engine holds only part of p on this rank (ZeRO-3 or an FSDP2 DTensor)."""
    return is_zero3_partitioned(p) or is_dtensor(p)


@contextlib.contextmanager
def _gathered(p: torch.Tensor):
    """p whole within the block, on every rank (all ranks must enter: it is a collective)."""
    if is_zero3_partitioned(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            yield p
    elif is_dtensor(p):
        yield p.full_tensor()
    else:
        yield p


def whole_copies(tensors: dict[str, torch.Tensor], expected: dict[str, tuple], who: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every tensor, gathered where sharded; raises IncompleteAdapterError
    naming each one that is empty or not its whole shape. Under ZeRO-3 or FSDP2 every rank must
    call it (the gathers are collectives), in the same order."""
    out, short = {}, []
    with torch.no_grad():
        for name, t in tensors.items():
            with _gathered(t) as whole:
                # Copied inside the block: on leaving it ZeRO-3 frees the gathered storage.
                out[name] = whole.detach().to("cpu", copy=True)
            want = expected[name]
            if tuple(out[name].shape) != tuple(want) or (out[name].numel() == 0 and 0 not in want):
                short.append(f"{name}: {tuple(out[name].shape)} where the adapter needs {tuple(want)}")
    if short:
        listed = "; ".join(short[:5]) + (f"; and {len(short) - 5} more" if len(short) > 5 else "")
        raise IncompleteAdapterError(
            f"{who}: refusing to write an adapter with {len(short)} tensors that are not whole ({listed}). An engine "
            "holds them sharded or offloaded in a way msplora_kernels cannot gather (it gathers DeepSpeed ZeRO-3 and "
            "FSDP2); gather the model's parameters first (for example, save from a model loaded whole), and call "
            "this on every rank.")
    return out
