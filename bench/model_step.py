"""--model: a full training step of a LLaMA-style model with random weights (no download).

No adapter (frozen model, gradients to the input embeddings) is the floor; then PEFT LoRA at
the global rank, and MSPLoRA on each available backend.
"""
from __future__ import annotations

import copy

import torch

import msplora_kernels as mk

# TinyLlama-1.1B's shape on a GPU; a small one that a 2-core CPU steps through in well under a second.
SHAPES = {
    "cuda": dict(name="tinyllama-1.1b", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, batch=4, seq=2048,
                 ranks=(64, 32, 16)),
    "cpu": dict(name="llama-small", hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=4000, batch=4, seq=256, ranks=(8, 4, 2)),
}
TARGETS = {"qv": ["q_proj", "v_proj"],
           "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


# --quantize: bitsandbytes' configs, as QLoRA loads a model (double-quantized NF4) or 8-bit.
QUANTIZE = {
    "nf4": lambda dtype: dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype),
    "int8": lambda dtype: dict(load_in_8bit=True),
}


def _base(shape, device, dtype, quantize=None):
    """The LLaMA-style model with random weights; with `quantize`, written to a temporary folder and
    loaded back by transformers with that BitsAndBytesConfig, as users load a quantized model."""
    import tempfile

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    cfg = LlamaConfig(**{k: shape[k] for k in keys}, max_position_embeddings=shape["seq"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if quantize:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=BitsAndBytesConfig(**QUANTIZE[quantize](dtype)), device_map=device,
                dtype=dtype)
    model.requires_grad_(False)
    return model


def weights_mb(model) -> float:
    """What the model's parameters and buffers take in memory (quantized ones as stored)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20


def _variant(base, method, backend, shape, targets, dropout):
    model = copy.deepcopy(base)
    if method == "no_adapter":
        model.enable_input_require_grads()  # the backward still runs through every layer
        return model
    if method == "peft_lora":
        import peft

        cfg = peft.LoraConfig(target_modules=targets, r=shape["ranks"][0], lora_alpha=16, lora_dropout=dropout)
        # Both adapters keep the model's dtype: PEFT's fp32 option also computes its branch in fp32.
        return peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    cfg = mk.MSPLoraConfig(target_modules=targets, ranks=shape["ranks"], lora_alpha=16, dropout=dropout,
                           backend=backend)
    return mk.apply_msplora(model, cfg, autocast_adapter_dtype=False)


def _runs(methods, device):
    runs = [("no_adapter", None)]
    if "peft_lora" in methods:
        runs.append(("peft_lora", None))
    if "msplora" in methods:
        runs += [("msplora", b) for b in mk.available_backends(device)
                 if not (b == "triton" and torch.device(device).type == "cpu")]
    return runs


def _calls(model, params, pool):
    """A forward (the loss) and a full training step (forward, backward, AdamW) of one variant."""
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    step_no = iter(range(10**12))

    def forward():
        ids = pool[next(step_no) % len(pool)]
        return model(input_ids=ids, labels=ids).loss

    def step():
        loss = forward()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return forward, step


def records(args) -> list[dict]:
    """The step of every variant on the float model, and with --quantize on the quantized one too."""
    shape = dict(SHAPES[args.device])
    if args.quick:
        shape.update(num_hidden_layers=2, seq=shape["seq"] // 2)
    out = []
    for quantize in [None] + ([args.quantize] if args.quantize else []):
        out += _records_for(args, shape, quantize)
    return out


def _records_for(args, shape, quantize) -> list[dict]:
    import timing
    from methods import PAPER_DROPOUT
    from runs import progress_bar, time_all

    base = _base(shape, args.device, args.dtype, quantize)
    targets = TARGETS[args.targets]
    tokens = shape["batch"] * shape["seq"]
    dropout = PAPER_DROPOUT if args.dropout is None else args.dropout
    pool = [torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=args.device) for _ in range(3)]
    runs = _runs(args.methods, args.device)
    variants = {}
    for method, backend in runs:
        model = _variant(base, method, backend, shape, targets, dropout).train()
        params = [p for p in model.parameters() if p.requires_grad]
        variants[(method, backend)] = (params, *_calls(model, params, pool), model)

    with progress_bar(len(runs), "model step" + (f" ({quantize})" if quantize else "")) as progress:
        timings = time_all({r: v[1:3] for r, v in variants.items()}, args, progress)

    out = []
    for (method, backend), (params, _, step, model) in variants.items():
        f, s = timings[(method, backend)]
        memory = timing.peak_memory_mb(step, args.device)
        if memory is None:  # on the CPU: a fresh process per variant (peak_rss_mb)
            memory = peak_rss_mb(args, method, backend, quantize)
        out.append({
            "case": f"{shape['name']}-{args.targets}" + (f"-{quantize}" if quantize else ""), "quantize": quantize,
            "method": method, "backend": backend, "device": args.device,
            "dtype": str(args.dtype).replace("torch.", ""), "tokens": tokens, "dropout": dropout,
            "in_features": shape["hidden_size"],
            "out_features": shape["hidden_size"], "layers": shape["num_hidden_layers"],
            "ranks": list(shape["ranks"]) if method == "msplora" else ([shape["ranks"][0]] if method == "peft_lora" else []),
            "trainable_params": sum(p.numel() for p in params),
            **timing.record_fields(f, s, tokens), "peak_mem_mb": memory,
            "weights_mb": weights_mb(model),
        })
    return out


def peak_rss_mb(args, method, backend, quantize) -> float:
    """On the CPU, where torch keeps no allocator statistics: the peak resident memory that two
    training steps add above the built model, in a fresh process that builds this variant alone."""
    import json
    import subprocess
    import sys

    spec = {"method": method, "backend": backend, "quantize": quantize, "dtype": str(args.dtype).replace("torch.", ""),
            "targets": args.targets, "quick": args.quick, "dropout": args.dropout}
    proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the memory of {spec} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _measure_one(spec: dict) -> dict:
    import gc

    from methods import PAPER_DROPOUT

    shape = dict(SHAPES["cpu"])
    if spec["quick"]:
        shape.update(num_hidden_layers=2, seq=shape["seq"] // 2)
    dtype = getattr(torch, spec["dtype"])
    base = _base(shape, "cpu", dtype, spec["quantize"])
    dropout = PAPER_DROPOUT if spec["dropout"] is None else spec["dropout"]
    model = _variant(base, spec["method"], spec["backend"], shape, TARGETS[spec["targets"]], dropout).train()
    del base
    pool = [torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"])) for _ in range(2)]
    _, step = _calls(model, [p for p in model.parameters() if p.requires_grad], pool)
    gc.collect()
    # The peak above what the model already holds: Linux resets the high-water mark on request.
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    step(), step()
    return {"peak_rss_mb": _status_mb("VmHWM") - before}


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(_measure_one(json.loads(sys.argv[1]))))
