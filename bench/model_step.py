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


def _base(shape, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    cfg = LlamaConfig(**{k: shape[k] for k in keys}, max_position_embeddings=shape["seq"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


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
    import timing
    from methods import PAPER_DROPOUT
    from throughput import progress_bar, time_all

    shape = dict(SHAPES[args.device])
    if args.quick:
        shape.update(num_hidden_layers=2, seq=shape["seq"] // 2)
    base = _base(shape, args.device, args.dtype)
    targets = TARGETS[args.targets]
    tokens = shape["batch"] * shape["seq"]
    dropout = PAPER_DROPOUT if args.dropout is None else args.dropout
    pool = [torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), device=args.device) for _ in range(3)]
    runs = _runs(args.methods, args.device)
    variants = {}
    for method, backend in runs:
        model = _variant(base, method, backend, shape, targets, dropout).train()
        params = [p for p in model.parameters() if p.requires_grad]
        variants[(method, backend)] = (params, *_calls(model, params, pool))

    with progress_bar(len(runs), "model step") as progress:
        timings = time_all({r: v[1:] for r, v in variants.items()}, args, progress)

    out = []
    for (method, backend), (params, _, step) in variants.items():
        f, s = timings[(method, backend)]
        out.append({
            "case": f"{shape['name']}-{args.targets}", "method": method, "backend": backend, "device": args.device,
            "dtype": str(args.dtype).replace("torch.", ""), "tokens": tokens, "dropout": dropout,
            "in_features": shape["hidden_size"],
            "out_features": shape["hidden_size"], "layers": shape["num_hidden_layers"],
            "ranks": list(shape["ranks"]) if method == "msplora" else ([shape["ranks"][0]] if method == "peft_lora" else []),
            "trainable_params": sum(p.numel() for p in params),
            **timing.record_fields(f, s, tokens), "peak_mem_mb": timing.peak_memory_mb(step, args.device),
        })
    return out
