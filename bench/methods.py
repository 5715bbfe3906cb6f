"""The layers compared by bench/throughput.py, each built from the same frozen nn.Linear."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

import msplora_kernels as mk

ALPHA = 16.0
# The paper's scripts (GLUE and LLaMA alike) train with lora_dropout 0.05; its naive branches each
# draw their own mask, so dropout is part of what the reference code costs.
PAPER_DROPOUT = 0.05


@dataclass(frozen=True)
class Case:
    name: str
    in_features: int
    out_features: int
    ranks: tuple
    lora_rank: int
    gpu_tokens: int
    cpu_tokens: int
    quick_tokens: int
    dropout: float = PAPER_DROPOUT


CASES = {
    "roberta-base": Case("roberta-base", 768, 768, (8, 4, 2), 8, 8192, 4096, 1024),
    "llama2-7b": Case("llama2-7b", 4096, 4096, (64, 32, 16), 64, 8192, 512, 128),
    # A smoke-test shape for the test suite; not in the defaults.
    "tiny": Case("tiny", 64, 48, (8, 4, 2), 8, 256, 64, 32),
}
DEFAULT_CASES = ("roberta-base", "llama2-7b")
METHODS = ("linear", "linear_onednn", "peft_lora", "msplora_naive", "msplora")


class NaiveMSPLoRA(nn.Module):
    """Three separate PEFT-style branches, as the paper's reference code runs them."""

    def __init__(self, base: nn.Linear, ranks, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for r in ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for r in ranks)
        self.drop = nn.ModuleList(nn.Dropout(dropout) for _ in ranks)
        self.scales = [ALPHA / r for r in ranks]

    def forward(self, x):
        y = self.base(x)
        for a, b, drop, s in zip(self.lora_A, self.lora_B, self.drop, self.scales):
            y += b(a(drop(x))) * s  # in place, as the paper's code adds each branch
        return y


class _Wrap(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _OneDnnLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], None)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return torch.ops.mkldnn._linear_pointwise(dy, weight.t(), None, "none", [], None), None, None


class OneDnnLinear(nn.Module):
    """The frozen linear with both its GEMMs (y and dx) on oneDNN, the library the cpp backend may
    choose for them: the floor the fused op is held to where oneDNN is the faster library."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base

    def forward(self, x):
        return _OneDnnLinearFunction.apply(x, self.base.weight, self.base.bias)


def onednn_available(device) -> bool:
    return torch.device(device).type == "cpu" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mkldnn::_linear_pointwise", "CPU")


class _WithoutLine(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_bitsandbytes_import() -> None:
    """PEFT imports bitsandbytes, which on CPUs with AVX512-BF16 logs that it could not fetch a
    4-bit GEMM kernel from a hub: nothing a float layer or model runs (a --quantize run keeps it)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _WithoutLine("Failed to load CPU gemm_4bit_forward from kernels-community"))


def peft_lora(base: nn.Linear, rank: int, dropout: float) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(target_modules=["proj"], r=rank, lora_alpha=ALPHA, lora_dropout=dropout)
    return peft.get_peft_model(_Wrap(base), cfg).base_model.model.proj


def _randomize_up_factors(module: nn.Module) -> None:
    # Zero B factors would let a kernel skip work or hide errors; train-like values instead.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and (name.endswith(".B") or "lora_B" in name):
                p.normal_(std=0.02)


def build(method: str, backend: str | None, case: Case, device, dtype, dropout: float) -> nn.Module:
    """A fresh layer for `method` on a frozen base of the case's shape."""
    base = nn.Linear(case.in_features, case.out_features, device=device, dtype=dtype).requires_grad_(False)
    if method == "linear":
        layer = base
    elif method == "linear_onednn":
        layer = OneDnnLinear(base)
    elif method == "peft_lora":
        layer = peft_lora(base, case.lora_rank, dropout)
    elif method == "msplora_naive":
        layer = NaiveMSPLoRA(base, case.ranks, dropout)
    elif method == "msplora":
        layer = mk.MSPLoraLinear.from_linear(base, ranks=case.ranks, lora_alpha=ALPHA, dropout=dropout, backend=backend)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    layer = layer.to(device=device, dtype=dtype).train()
    _randomize_up_factors(layer)
    return layer


def method_runs(methods, device) -> list[tuple[str, str | None]]:
    """(method, backend) pairs: one msplora run per backend available on the device."""
    runs = []
    for m in methods:
        if m == "msplora":
            runs += [("msplora", b) for b in mk.available_backends(device)
                     if not (b == "triton" and torch.device(device).type == "cpu")]
        elif m == "linear_onednn":
            runs += [(m, None)] if onednn_available(device) else []
        else:
            runs.append((m, None))
    return runs


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
